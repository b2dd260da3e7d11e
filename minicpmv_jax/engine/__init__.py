"""The serving engine: continuous batching of many requests over fixed decode slots of one model.

The public API, importable from here (each name lives in one module of this package, imported on first
use)::

    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, GenerationConfig
    from minicpmv_jax.engine import Engine, EngineConfig, request_from_messages

    model = MiniCPMV.from_pretrained(path)
    processor = MiniCPMVProcessor.from_pretrained(path)
    with Engine(model, processor, EngineConfig(max_batch=8, max_len=4096)) as engine:
        request = request_from_messages(processor, [{"role": "user", "content": [image, "What is it?"]}],
                                        GenerationConfig(max_new_tokens=256))
        for piece in engine.submit(request):
            print(piece.text, end="")

* the loop (:mod:`.engine`): :class:`Engine`, :class:`EngineConfig`, :class:`EngineStats`;
* requests (:mod:`.request`): :class:`Request`, :func:`request_from_messages`, :class:`RequestHandle`,
  :class:`Output`, :class:`Completion`, and the errors :class:`EngineError`, :class:`QueueFull`,
  :class:`EngineStopped`;
* the device side (:mod:`.slots`): the slot state and its compiled prefill, insert and decode programs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minicpmv_jax.lazy_exports import lazy_exports

# Public name → the module of this package that defines it.
_EXPORTS = {
    "Engine": "engine", "EngineConfig": "engine", "EngineStats": "engine",
    "Request": "request", "request_from_messages": "request", "RequestHandle": "request", "Output": "request",
    "Completion": "request", "EngineError": "request", "QueueFull": "request", "EngineStopped": "request",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .engine import Engine, EngineConfig, EngineStats
    from .request import (Completion, EngineError, EngineStopped, Output, QueueFull, Request, RequestHandle,
                          request_from_messages)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
