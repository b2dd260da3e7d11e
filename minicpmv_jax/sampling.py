"""Logits processing and token choice for generation, with the semantics of transformers' ``generate``.

Pure, jittable functions for the compiled decode loop (docs/model.md §7). Every sampling parameter is an array
inside :class:`SamplingParams`, so new values of temperature, top-k, top-p, repetition penalty or
min_new_tokens reuse the compiled loop. Shape letters as in :mod:`minicpmv_jax.layers` (B rows — batch,
or batch·beams in beam search —, V vocabulary), plus E stop ids.

HF semantics reproduced (transformers 5.x, ``_get_logits_processor`` / ``_sample`` / ``_beam_search``):

* Processor order: repetition penalty, min-new-tokens stop suppression, then — only when sampling —
  temperature, top-k, top-p. Beam search applies the processors to ``log_softmax(logits)``, without the
  warpers (:func:`beam_log_probs`).
* The reference generates from ``inputs_embeds``, so the processors only see generated tokens: the
  repetition penalty counts generated tokens and min_new_tokens counts them. HF also passes the prompt's
  left-padding length to the penalty as ``prompt_ignore_length``, which, with ``inputs_embeds``, exempts
  the first ``pad_len`` *generated* tokens of a padded row from the penalty; :func:`update_seen`'s
  ``start`` reproduces that.
* Top-k keeps every token tied with the k-th largest value; top-p sorts ascending, drops the sorted
  tokens whose cumulative probability is ``<= 1 - top_p`` (threshold rounded to float32 from double, as
  torch compares) and always keeps the most probable one. Among tokens with *equal* logits straddling the
  top-p cut, torch's (unstable, implementation-defined) sort decides which are dropped; here the sort is
  stable, so the lower token ids are dropped first. The number dropped is the same.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import struct

__all__ = [
    "SamplingParams", "divide", "update_seen", "apply_repetition_penalty", "suppress_stop_tokens",
    "apply_temperature", "process_logits", "warp",
    "beam_log_probs", "sample", "greedy",
]

_NEG_INF = -jnp.inf


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@struct.dataclass
class SamplingParams:
    """Logits-processing parameters, traced arrays (never static): 0-d for one request, or ``[B]`` with one
    value per row (a serving engine's decode slots, each running its own request; :meth:`stack`).

    temperature         float32  > 0 (1 leaves logits unchanged)
    top_k               int32    keep the top_k largest logits (ties included); <= 0 disables
    top_p               float32  nucleus mass in [0, 1]; 1 disables
    top_p_cut           float32  ``float32(1 - top_p)`` computed in double, the exact threshold HF compares
                                 cumulative probabilities against (set by :meth:`make`)
    repetition_penalty  float32  > 0; 1 disables
    min_new_tokens      int32    stop ids are suppressed while fewer tokens were generated
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    top_p_cut: jax.Array
    repetition_penalty: jax.Array
    min_new_tokens: jax.Array

    @classmethod
    def make(cls, temperature: float = 1.0, top_k: int | None = 0, top_p: float | None = 1.0,
             repetition_penalty: float = 1.0, min_new_tokens: int | None = 0) -> "SamplingParams":
        """Validates Python values (HF's rules) and packs them; ``None`` disables top_k / top_p / min length.

        Note that HF's own ``GenerationConfig`` defaults to ``top_k=50``: pass the values you want explicitly.
        """
        if not _is_real(temperature) or not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be a finite float > 0 (use greedy or beam search instead of "
                             f"temperature 0), got {temperature!r}")
        top_k = 0 if top_k is None else top_k
        if not _is_int(top_k) or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 or None disables it), got {top_k!r}")
        top_p = 1.0 if top_p is None else top_p
        if not _is_real(top_p) or not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be a float in [0, 1] (1 or None disables it), got {top_p!r}")
        if not _is_real(repetition_penalty) or not 0 < repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite float > 0 (1 disables it), "
                             f"got {repetition_penalty!r}")
        min_new_tokens = 0 if min_new_tokens is None else min_new_tokens
        if not _is_int(min_new_tokens) or min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        return cls(temperature=jnp.float32(temperature), top_k=jnp.int32(min(top_k, 2 ** 31 - 1)),
                   top_p=jnp.float32(top_p), top_p_cut=jnp.float32(1.0 - float(top_p)),
                   repetition_penalty=jnp.float32(repetition_penalty),
                   min_new_tokens=jnp.int32(min(min_new_tokens, 2 ** 31 - 1)))

    @classmethod
    def stack(cls, rows: "list[SamplingParams]") -> "SamplingParams":
        """Per-row parameters ``[B]`` from B 0-d ones (each made by :meth:`make`)."""
        return jax.tree.map(lambda *xs: jnp.stack(xs), *rows)


def _per_row(x: jax.Array) -> jax.Array:
    """A parameter for ``[B, V]`` scores: 0-d stays 0-d, ``[B]`` becomes ``[B, 1]``."""
    x = jnp.asarray(x)
    return x if x.ndim == 0 else x[:, None]


def divide(x: jax.Array, divisor: jax.Array) -> jax.Array:
    """IEEE float division of ``x`` by a scalar (or broadcastable) ``divisor``, as torch computes it.

    XLA's simplifier rewrites ``x / broadcast(d)`` into ``x * (1 / d)``, which differs in the last bit;
    materialising the divisor behind an optimisation barrier keeps a true division.
    """
    d = jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape)
    return x / jax.lax.optimization_barrier(d)


# --------------------------------------------------------------------------- generated-token bookkeeping


def update_seen(seen: jax.Array, tokens: jax.Array, position: jax.Array | int = 0,
                start: jax.Array | None = None) -> jax.Array:
    """Marks ``tokens [B]`` in ``seen [B, V]`` (bool: which tokens the repetition penalty applies to).

    ``position`` (int32, scalar or ``[B]``) is the index of ``tokens`` among the generated tokens; a row
    records its token only if ``position >= start[row]`` (int32 ``[B]``, default: every row records). HF's
    ``prompt_ignore_length`` — the index of each row's first real prompt slot, ``argmax(attention_mask != 0)``
    — as ``start`` reproduces its quirk with ``inputs_embeds`` (the first ``pad_len`` generated tokens of a
    left-padded row are never penalised); generation itself passes no ``start``. Ids outside ``[0, V)`` are
    ignored.
    """
    v = seen.shape[-1]
    hit = jnp.arange(v, dtype=jnp.int32)[None, :] == tokens.astype(jnp.int32)[:, None]
    if start is not None:
        record = jnp.asarray(position, jnp.int32) >= start.astype(jnp.int32)
        hit = hit & record[:, None]
    return seen | hit


# --------------------------------------------------------------------------- processors ([B, V] float32)


def apply_repetition_penalty(scores: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF ``RepetitionPenaltyLogitsProcessor``: a seen token's score is ``s * p`` if ``s < 0`` else ``s / p``.

    scores ``[B, V]`` float32, seen ``[B, V]`` bool, penalty 0-d or ``[B]`` (1 leaves scores unchanged).
    """
    penalty = _per_row(penalty)
    penalised = jnp.where(scores < 0, scores * penalty, divide(scores, penalty))
    return jnp.where(seen, penalised, scores)


def suppress_stop_tokens(scores: jax.Array, stop_ids: jax.Array, num_generated: jax.Array | int,
                         min_new_tokens: jax.Array) -> jax.Array:
    """HF ``MinNewTokensLengthLogitsProcessor``: stop ids get ``-inf`` while ``num_generated < min_new_tokens``.

    scores ``[B, V]``; stop_ids int32 ``[E]``, or ``[B, E]`` per row (entries < 0 are padding); num_generated:
    tokens generated so far, and min_new_tokens, each scalar or ``[B]``.
    """
    v = scores.shape[-1]
    vocab = jnp.arange(v, dtype=jnp.int32)
    stop_ids = stop_ids.astype(jnp.int32)
    if stop_ids.ndim == 1:
        is_stop = jnp.any(vocab[:, None] == stop_ids[None, :], axis=-1)[None, :]           # [1, V]
    else:
        is_stop = jnp.any(vocab[None, :, None] == stop_ids[:, None, :], axis=-1)           # [B, V]
    too_early = jnp.reshape(jnp.asarray(num_generated, jnp.int32) < min_new_tokens, (-1, 1))   # [B | 1, 1]
    return jnp.where(is_stop & too_early, _NEG_INF, scores)


def apply_temperature(scores: jax.Array, temperature: jax.Array) -> jax.Array:
    """HF ``TemperatureLogitsWarper``: ``scores / temperature`` (float32 division; 0-d or ``[B]``)."""
    return divide(scores, _per_row(temperature))


def _filter(scores: jax.Array, top_k: jax.Array, top_p_cut: jax.Array, use_top_p: jax.Array) -> jax.Array:
    """Top-k then top-p with one stable ascending sort (equal to HF's two sorts, see module docstring).
    Each parameter is 0-d or ``[B]``."""
    b, v = scores.shape
    order = jnp.argsort(scores, axis=-1, stable=True)                              # ascending, [B, V]
    ascending = jnp.take_along_axis(scores, order, axis=-1)
    k = jnp.broadcast_to(jnp.where(top_k > 0, jnp.minimum(top_k, v), v), (b,))
    kth_largest = jnp.take_along_axis(ascending, (v - k)[:, None], axis=-1)        # [B, 1]
    top_p_cut, use_top_p = _per_row(top_p_cut), _per_row(use_top_p)
    # HF top-k: drop scores strictly below the k-th largest; they form a prefix of `ascending`.
    ascending = jnp.where(ascending < kth_largest, _NEG_INF, ascending)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = (cumulative <= top_p_cut) & use_top_p
    drop_sorted = drop_sorted.at[:, -1].set(False)                                 # min_tokens_to_keep = 1
    drop_sorted = drop_sorted | (ascending == _NEG_INF)                            # top-k's drops
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(b)[:, None], order].set(drop_sorted)
    return jnp.where(drop, _NEG_INF, scores)


def process_logits(logits: jax.Array, seen: jax.Array, num_generated: jax.Array | int, params: SamplingParams,
                   stop_ids: jax.Array, *, do_sample: bool = True) -> jax.Array:
    """HF's processor list for ``_sample``: logits ``[B, V]`` → processed float32 scores ``[B, V]``.

    Order: repetition penalty (``seen``), stop-id suppression before ``min_new_tokens`` generated tokens,
    then, if ``do_sample``, temperature, top-k, top-p. ``do_sample`` is a static mode switch (greedy
    decoding uses no warpers, exactly like HF); the parameters themselves are arrays, 0-d or ``[B]``.
    """
    scores = logits.astype(jnp.float32)
    scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    scores = suppress_stop_tokens(scores, stop_ids, num_generated, params.min_new_tokens)
    if not do_sample:
        return scores
    return warp(scores, params)


def warp(scores: jax.Array, params: SamplingParams) -> jax.Array:
    """The sampling warpers on processed scores ``[B, V]``: temperature, then top-k and top-p (the sort
    skipped when no row uses either)."""
    scores = apply_temperature(scores, params.temperature)
    use_top_p = params.top_p < 1.0
    return jax.lax.cond(jnp.any((params.top_k > 0) | use_top_p),
                        lambda s: _filter(s, params.top_k, params.top_p_cut, use_top_p),
                        lambda s: s, scores)


def beam_log_probs(logits: jax.Array, seen: jax.Array, num_generated: jax.Array | int, params: SamplingParams,
                   stop_ids: jax.Array) -> jax.Array:
    """HF ``_beam_search`` scores: ``log_softmax(logits)`` then repetition penalty and stop suppression.

    logits ``[B, V]`` (B = batch·beams) → float32 ``[B, V]``. The penalty acts on (negative) log-probs, so a
    seen token's log-prob is multiplied by the penalty. No warpers (beam search without sampling).
    """
    scores = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
    return suppress_stop_tokens(scores, stop_ids, num_generated, params.min_new_tokens)


# --------------------------------------------------------------------------- token choice


def sample(key: jax.Array, scores: jax.Array) -> jax.Array:
    """Draws one token per row from ``softmax(scores [B, V])`` (``-inf`` never drawn) → int32 ``[B]``."""
    return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)


def greedy(scores: jax.Array) -> jax.Array:
    """``argmax`` per row (first index on ties, like ``torch.argmax``) → int32 ``[B]``."""
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
