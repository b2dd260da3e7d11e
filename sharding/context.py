"""The sharding context: which mesh and which rules constrain activations while a program is traced.

Parameters carry their placement with them (each array's ``NamedSharding``); activations do not exist
until a program is traced, and the towers only *name* their logical axes there
(``constrain(x, RESIDUAL_AXES)``). Which mesh axis those names map to is decided by the context the
program is traced in::

    with sharding.use_mesh(mesh, sharding.TRAINING_RULES):
        loss = jax.jit(loss_fn)(...)        # the residual stream traced here is split by batch

No tower, and no model, stores a mesh or rules. The compiled programs of this package take the context
as a static argument (:class:`ShardingContext`, hashable, so a program traced under one context is
never reused under another) and enter it while they trace; the context is read at trace time only.

``chat`` / ``compute_logits`` / ``generate`` build theirs from the mesh the parameters live on
(``MiniCPMVModel.mesh``) and the rules of the surrounding context (:data:`RULES` by default), so
``with sharding.use_rules(sharding.TRAINING_RULES): model.compute_logits(batch)`` switches the layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Iterator

from jax.sharding import Mesh

from minicpmv_jax.errors import ArgumentError

from .rules import RULES, Rules, check_rules

__all__ = ["ShardingContext", "use_mesh", "use_rules", "current_context", "context_for"]


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    """A mesh (None: constrain nothing) and the rules that map logical axis names onto it."""

    mesh: Mesh | None = None
    rules: Rules = RULES

    def __post_init__(self) -> None:
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise ArgumentError("{} must be a jax.sharding.Mesh or None, got {kind}", "mesh",
                                kind=type(self.mesh).__name__)
        object.__setattr__(self, "rules", check_rules(self.rules))


_CURRENT: contextvars.ContextVar[ShardingContext] = contextvars.ContextVar(
    "minicpmv_jax.sharding.context", default=ShardingContext())


def current_context() -> ShardingContext:
    """The innermost :func:`use_mesh` / :func:`use_rules` context (no mesh and :data:`RULES` outside any)."""
    return _CURRENT.get()


@contextlib.contextmanager
def _entered(context: ShardingContext) -> Iterator[ShardingContext]:
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def use_mesh(mesh: Mesh | None, rules: Rules = RULES) -> contextlib.AbstractContextManager[ShardingContext]:
    """A context in which traced activations are constrained on ``mesh`` per ``rules`` (``None``: not at all).

    Also accepts a :class:`ShardingContext` as ``mesh`` (then ``rules`` is ignored), which is how the
    compiled programs enter the context they were given.
    """
    context = mesh if isinstance(mesh, ShardingContext) else ShardingContext(mesh, rules)
    return _entered(context)


def use_rules(rules: Rules) -> contextlib.AbstractContextManager[ShardingContext]:
    """A context with other rules and the current mesh, e.g. ``with use_rules(TRAINING_RULES): ...``."""
    return _entered(ShardingContext(current_context().mesh, rules))


def context_for(mesh: Mesh | None) -> ShardingContext:
    """``mesh`` (where a model's parameters live) with the rules of the current context: what a compiled
    program of that model is traced under."""
    return ShardingContext(mesh, current_context().rules)
