"""The optimizer of a fine-tuning run: AdamW, linear warmup + cosine decay, global-norm clipping.

Built from a :class:`~minicpmv_jax.finetune.config.TrainConfig` for the tree of *trainable* parameters
only (nested dicts keyed by path components, float32): frozen parameters get neither gradients nor
optimizer state. The moments have the parameters' dtype, float32.

Gradient accumulation is not an optax wrapper here: the train step sums the micro-batches' loss and
gradient *sums* and divides once by the step's target-token count (:mod:`minicpmv_jax.finetune.loss`),
which is exact where ``optax.MultiSteps`` would average per-micro-batch means. One optimizer update per
train step; the schedule counts updates.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import optax

from minicpmv_jax import orbax_checkpoint as ock

from .config import TrainConfig, first_match

__all__ = ["learning_rate_schedule", "decay_mask", "make_optimizer"]


def learning_rate_schedule(config: TrainConfig):
    """``step → learning rate`` (jittable), for update ``step`` (0-based): ``lr · step / warmup_steps`` during
    the warmup (the first update of a warmup uses 0, as Hugging Face's and optax's schedules do), then a half
    cosine from ``learning_rate`` down to ``end_learning_rate`` at ``total_steps``, constant after."""
    peak, end = float(config.learning_rate), float(config.end_learning_rate)
    warmup, total = int(config.warmup_steps), int(config.total_steps)
    decay_steps = max(total - warmup, 1)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = peak * s / float(max(warmup, 1))
        progress = jnp.clip((s - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def decay_mask(params: Mapping[str, Any], patterns) -> dict:
    """A tree of bools like ``params``: True where ``patterns`` (first-match rules over the ``/``-joined
    path, see :mod:`minicpmv_jax.finetune.config`) select the parameter for weight decay."""
    return ock.nest({key: first_match(patterns, ock.show(key)) for key, _ in ock.flatten(params)})


def make_optimizer(config: TrainConfig, params: Mapping[str, Any]) -> tuple[optax.GradientTransformation, Any]:
    """(the optax transformation, the learning-rate schedule) for the trainable ``params`` tree (abstract
    leaves are fine: only the paths are read, for the weight-decay mask)."""
    schedule = learning_rate_schedule(config)
    adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                        weight_decay=config.weight_decay, mask=decay_mask(params, config.decay))
    if config.max_grad_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw), schedule
