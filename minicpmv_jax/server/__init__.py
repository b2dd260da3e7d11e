"""An OpenAI-compatible HTTP server over the serving engine (``minicpmv-jax serve``).

The public API, importable from here (each name lives in one module of this package, imported on first
use)::

    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor
    from minicpmv_jax.engine import Engine, EngineConfig
    from minicpmv_jax.server import create_app

    engine = Engine(model, processor, EngineConfig(max_batch=8, max_len=4096))
    app = create_app(engine, processor, "minicpm-v-2_6", api_key="secret")   # a FastAPI application
    uvicorn.run(app, host="127.0.0.1", port=8000)

* the application (:mod:`.app`): :func:`create_app`;
* request bodies → engine requests (:mod:`.protocol`), media parts → images (:mod:`.media`), response
  objects (:mod:`.responses`), OpenAI-shaped errors (:mod:`.errors`): :class:`APIError`;
* per-request limits (:mod:`.limits`): :class:`Limits`;
* Prometheus metrics (:mod:`.metrics`): :class:`Metrics`.

docs/serving.md describes the endpoints, parameters, errors, metrics and lifecycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minicpmv_jax.lazy_exports import lazy_exports

# Public name → the module of this package that defines it.
_EXPORTS = {"create_app": "app", "APIError": "errors", "Limits": "limits", "Metrics": "metrics"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .app import create_app
    from .errors import APIError
    from .limits import Limits
    from .metrics import Metrics


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
