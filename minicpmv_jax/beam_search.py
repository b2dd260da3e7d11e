"""Beam search bookkeeping with the semantics of transformers 5.x ``_beam_search`` (docs/model.md §7).

Static shapes and pure functions, for one ``jax.jit`` / ``lax.while_loop``. Shape letters as in
:mod:`minicpmv_jax.layers` (B batch, V vocabulary), plus:

    W beams per batch row (``num_beams``)     E stop ids
    A candidates kept per row and step, ``max(2, 1 + E) · W`` (HF's ``beams_to_keep``)
    M token buffer (capacity for max_new_tokens)

Rows of the flat ``[B·W]`` axis are ordered ``b·W + w`` (HF's ``repeat_interleave`` expansion). Per step
(HF vectorised algorithm, with ``early_stopping=False``):

1. ``scores[b, w, v] = log_probs[b·W + w, v] + running_scores[b, w]``; take the top A over ``W·V``.
2. A candidate "hits" when its token is a stop id or it reaches ``max_new_tokens``.
3. The next W running beams are the top W candidates after adding ``-1e9`` to hits.
4. The first W candidates that hit are finished hypotheses scored ``sum_logprobs / len ** length_penalty``
   (len = generated tokens incl. the stop token); they are merged with the W best finished ones so far,
   unless the row can no longer improve.
5. A row can no longer improve once all W finished slots are filled and the best running beam's
   ``score / len ** length_penalty`` is not above the worst finished score. Generation stops when no row
   can improve, or when every candidate of the step hit (always at ``max_new_tokens``).

The answer per row is the best finished hypothesis. Ties: ``jax.lax.top_k`` orders equal values by
lower index first; ``torch.topk`` orders them in an implementation-defined way, so results can differ
from HF only when two candidates' float32 scores are exactly equal at a cut.

The exponent is applied as HF does: ``float32(len ** length_penalty)`` computed in double on the host
(:meth:`BeamParams.make`) and indexed by length, since float32 ``pow`` on device differs in the last bit.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .sampling import divide

__all__ = ["BeamParams", "BeamState", "init", "step", "done", "finalize", "gather_beams", "expand_beams"]

_BIG = -1.0e9   # HF's "very large negative" score offset


@struct.dataclass
class BeamParams:
    """Per-request beam-search constants (arrays; only their shapes are static).

    length_norm     float32 ``[M + 1]``  ``float32(t ** length_penalty)`` for t = 1…M (HF's divisor; [0] unused)
    max_new_tokens  int32   ``[]``       HF ``max_length`` (generation from embeddings: no prompt), ≤ M
    stop_ids        int32   ``[E]``      HF ``eos_token_id`` (E also sets the candidate count A)
    fill_id         int32   ``[]``       what HF writes after a hypothesis' end: ``pad_token_id or
                                         eos_token_id[0]`` (so pad id 0 gives eos[0]), -1 without stop ids
    """

    length_norm: jax.Array
    max_new_tokens: jax.Array
    stop_ids: jax.Array
    fill_id: jax.Array

    @classmethod
    def make(cls, *, max_new_tokens: int, stop_ids: Sequence[int] = (), length_penalty: float = 1.0,
             pad_id: int | None = None, capacity: int | None = None) -> "BeamParams":
        """Validates Python values and packs them. ``capacity`` (M, default ``max_new_tokens``) sets the
        token buffer; a fixed capacity lets different ``max_new_tokens`` share one compiled loop."""
        if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        capacity = max_new_tokens if capacity is None else capacity
        if not isinstance(capacity, numbers.Integral) or capacity < max_new_tokens:
            raise ValueError(f"capacity must be an integer >= max_new_tokens ({max_new_tokens}), got {capacity!r}")
        if not isinstance(length_penalty, numbers.Real) or isinstance(length_penalty, bool) \
                or not np.isfinite(length_penalty):
            raise ValueError(f"length_penalty must be a finite float, got {length_penalty!r}")
        stop = [int(s) for s in stop_ids]
        if any(s < 0 for s in stop) or len(set(stop)) != len(stop):
            raise ValueError(f"stop_ids must be distinct non-negative token ids, got {list(stop_ids)!r}")
        if pad_id is not None and (not isinstance(pad_id, numbers.Integral) or pad_id < 0):
            raise ValueError(f"pad_id must be a non-negative token id or None, got {pad_id!r}")
        fill = (pad_id or stop[0]) if stop else -1          # HF: `pad_token_id or eos_token_id[0]`
        lp = float(length_penalty)
        norm = np.array([float(t) ** lp if t else 1.0 for t in range(capacity + 1)]).astype(np.float32)
        return cls(length_norm=jnp.asarray(norm), max_new_tokens=jnp.int32(max_new_tokens),
                   stop_ids=jnp.asarray(np.array(stop, np.int32).reshape(-1)), fill_id=jnp.int32(fill))


@struct.dataclass
class BeamState:
    """Beam-search state; ``params`` rides along so :func:`step` needs only the new log-probs.

    step              int32   ``[]``         tokens generated so far (HF ``cur_len`` − prompt length)
    running_tokens    int32   ``[B, W, M]``  live beams (fill_id past ``step``)
    running_scores    float32 ``[B, W]``     summed processed log-probs, best first
    finished_tokens   int32   ``[B, W, M]``  best finished hypotheses, best first
    finished_scores   float32 ``[B, W]``     length-normalised scores (-1e9 for empty slots)
    finished_lengths  int32   ``[B, W]``     generated length incl. the stop token
    is_finished       bool    ``[B, W]``     slot holds a real hypothesis
    improvable        bool    ``[B]``        HF ``is_early_stop_heuristic_unsatisfied``
    active            bool    ``[B]``        False for filler rows: they never keep the loop running
    all_stopped       bool    ``[]``         every candidate of the last step hit a stop criterion
    """

    step: jax.Array
    running_tokens: jax.Array
    running_scores: jax.Array
    finished_tokens: jax.Array
    finished_scores: jax.Array
    finished_lengths: jax.Array
    is_finished: jax.Array
    improvable: jax.Array
    active: jax.Array
    all_stopped: jax.Array
    params: BeamParams

    @property
    def num_beams(self) -> int:
        return self.running_scores.shape[1]

    @property
    def num_candidates(self) -> int:
        """A = HF's ``beams_to_keep``."""
        return max(2, 1 + self.params.stop_ids.shape[0]) * self.num_beams


def init(params: BeamParams, batch_size: int, num_beams: int, active: jax.Array | None = None) -> BeamState:
    """The state before the first step; ``active`` bool ``[B]`` marks real rows (default all).

    Beam 0 of each row starts at score 0 and the others at -1e9, so the first step expands beam 0 only
    (all W rows of a batch row hold the same prompt).
    """
    if not isinstance(num_beams, int) or num_beams < 2:
        raise ValueError(f"num_beams must be an integer >= 2 (use greedy decoding for 1), got {num_beams!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    m = params.length_norm.shape[0] - 1
    tokens = jnp.full((batch_size, num_beams, m), params.fill_id, jnp.int32)
    running_scores = jnp.full((batch_size, num_beams), _BIG, jnp.float32).at[:, 0].set(0.0)
    active = jnp.ones((batch_size,), bool) if active is None else jnp.asarray(active, bool)
    return BeamState(
        step=jnp.int32(0), running_tokens=tokens, running_scores=running_scores, finished_tokens=tokens,
        finished_scores=jnp.full((batch_size, num_beams), _BIG, jnp.float32),
        finished_lengths=jnp.zeros((batch_size, num_beams), jnp.int32),
        is_finished=jnp.zeros((batch_size, num_beams), bool), improvable=active, active=active,
        all_stopped=jnp.asarray(False), params=params)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gathers along axis 1: x ``[B, N, ...]``, idx ``[B, R]`` → ``[B, R, ...]``."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def step(state: BeamState, log_probs: jax.Array) -> tuple[BeamState, jax.Array, jax.Array]:
    """One beam-search step.

    log_probs float32 ``[B·W, V]``: processed log-probs of the current beams
    (:func:`minicpmv_jax.sampling.beam_log_probs`). Returns ``(state, next_tokens [B·W], beam_idx [B·W])``:
    new row r continues old row ``beam_idx[r]`` (a flat index into ``B·W``) with token ``next_tokens[r]``.
    Reorder everything per-beam (KV cache, ``seen`` mask) with :func:`gather_beams` before feeding
    ``next_tokens``.
    """
    p = state.params
    b, w, m = state.running_tokens.shape
    v = log_probs.shape[-1]
    a = state.num_candidates
    t = state.step

    scores = log_probs.astype(jnp.float32).reshape(b, w, v) + state.running_scores[:, :, None]
    top_scores, top_index = jax.lax.top_k(scores.reshape(b, w * v), a)              # [B, A]
    source = top_index // v
    token = (top_index % v).astype(jnp.int32)
    cand_tokens = _take(state.running_tokens, source)                                # [B, A, M]
    cand_tokens = jnp.where(jnp.arange(m) == t, token[:, :, None], cand_tokens)
    hits = jnp.any(token[:, :, None] == p.stop_ids, axis=-1) | (t + 1 >= p.max_new_tokens)

    # Running beams for the next step: the best W candidates that did not hit.
    running_all = top_scores + hits.astype(jnp.float32) * _BIG
    _, keep = jax.lax.top_k(running_all, w)                                          # [B, W]
    running_tokens = _take(cand_tokens, keep)
    running_scores = _take(running_all, keep)
    beam_idx = (_take(source, keep) + jnp.arange(b)[:, None] * w).reshape(b * w).astype(jnp.int32)
    next_tokens = _take(token, keep).reshape(b * w)

    # Finished hypotheses: only the first W candidates may finish (same float ops, same order as HF).
    just_finished = hits & (jnp.arange(a) < w)[None, :]
    finished_all = divide(top_scores, p.length_norm[t + 1])
    finished_all = finished_all + (~state.improvable).astype(jnp.float32)[:, None] * _BIG
    finished_all = finished_all + (~just_finished).astype(jnp.float32) * _BIG
    merged_scores = jnp.concatenate([state.finished_scores, finished_all], axis=1)  # [B, W + A]
    _, best = jax.lax.top_k(merged_scores, w)
    finished_tokens = _take(jnp.concatenate([state.finished_tokens, cand_tokens], axis=1), best)
    finished_scores = _take(merged_scores, best)
    lengths = jnp.concatenate([state.finished_lengths, jnp.full((b, a), t + 1, jnp.int32)], axis=1)
    finished_lengths = _take(lengths, best)
    is_finished = _take(jnp.concatenate([state.is_finished, just_finished], axis=1), best)

    # HF's early-stop heuristic for early_stopping=False: best running score at the current length.
    best_running = divide(running_scores[:, :1], p.length_norm[t + 1])
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _BIG)
    improvable = state.improvable & jnp.any(best_running > worst_finished, axis=-1)
    all_stopped = jnp.all(hits | ~state.active[:, None])

    new_state = state.replace(
        step=t + 1, running_tokens=running_tokens, running_scores=running_scores,
        finished_tokens=finished_tokens, finished_scores=finished_scores, finished_lengths=finished_lengths,
        is_finished=is_finished, improvable=improvable, all_stopped=all_stopped)
    return new_state, next_tokens, beam_idx


def done(state: BeamState) -> jax.Array:
    """True once HF's loop would stop (no row can improve, or every candidate hit a stop); bool ``[]``."""
    return ~(jnp.any(state.improvable & state.active) & ~state.all_stopped)


def finalize(state: BeamState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The chosen hypothesis per batch row: ``(tokens [B, M], lengths [B], scores [B])``.

    ``tokens[b, :lengths[b]]`` is what HF's ``generate`` returns for row b after the prompt (the final stop
    token included; ``fill_id`` after it). HF's tensor is ``tokens[:, :max(lengths)]``; ``scores`` equals
    its ``sequences_scores``.
    """
    return state.finished_tokens[:, 0], state.finished_lengths[:, 0], state.finished_scores[:, 0]


def gather_beams(tree, beam_idx: jax.Array):
    """Reorders every array of ``tree`` along axis 0 (the flat ``B·W`` axis) by ``beam_idx [B·W]``.

    Use it on the KV cache (:class:`minicpmv_jax.kv_cache.KVCache`) and the ``seen`` mask after each step.
    """
    return jax.tree.map(lambda x: jnp.take(x, beam_idx, axis=0), tree)


def expand_beams(tree, num_beams: int):
    """Repeats every array of ``tree`` ``num_beams`` times along axis 0: ``[B, ...]`` → ``[B·W, ...]``
    (row b·W + w is a copy of row b), e.g. a prefilled KV cache, attention masks, penalty starts."""
    return jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0), tree)
