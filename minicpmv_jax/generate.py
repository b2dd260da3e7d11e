"""Compiled generation: prefill plus the whole decode loop in one ``jax.jit`` (docs/model.md §7).

The loop state is an explicit pytree (:class:`DecodeState`) over a static KV cache. Per request only
arrays change — sampling parameters, ``max_new_tokens``, stop ids, the PRNG key — so a stream of
requests with the same bucketed shapes reuses one compiled program. Static are: the strategy (greedy,
sample, beam), the number of beams, and the buffer sizes (prompt length T, batch B and new-token
buffer N, each bucketed by the caller).

Layout of the cache slots: ``[0, T)`` hold the left-padded prompt (``key_valid`` False on padding), slot
``T + i`` the i-th generated token's input. Row b's position ids continue from its own prompt length.

Shape letters as in ``layers.py``; N here is the new-token buffer length, S = T + N the cache length,
K the beams (in beam search, rows are B·K, beam-major within a batch row).

The repetition penalty counts every generated token of a row (MiniCPM-V's reference semantics, with
transformers 4.40). transformers ≥ 5 exempts the first ``pad_len`` generated tokens of a left-padded row
when generating from ``inputs_embeds`` (``prompt_ignore_length`` aimed at prompt ids that are absent
there); we do not copy that, so a row's answer never depends on the batch it is in
(``sampling.update_seen``'s ``start`` reproduces the quirk if ever needed).

Entry points:

* :func:`generate` — one compiled call: embeddings in, tokens out (non-streaming).
* :func:`prefill` / :func:`decode_step` — the same maths split at the token boundary, jitted separately,
  driven from Python for streaming (greedy and sampling); the token sequence is identical.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from minicpmv_jax import sharding
from minicpmv_jax import beam_search, sampling
from minicpmv_jax.image_inputs import place_features
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.qwen2 import attention_mask, positions_from_mask

__all__ = ["DecodeState", "GenerationOutput", "generate", "prefill", "decode_step"]


@struct.dataclass
class DecodeState:
    """Everything the greedy / sampling loop carries from one token to the next.

    Attributes:
      step: [] int32, tokens generated so far.
      tokens: [B, N] int32 output buffer (0 after a row stopped).
      lengths: [B] int32 tokens generated per row, its stop token included.
      done: [B] bool, the row emitted a stop token (or is a padding row).
      logits: [B, V] float32 next-token logits (from the prefill or the last decode step).
      positions: [B] int32 position id of the next token fed.
      key_valid: [B, S] bool, which cache slots hold real tokens.
      cache: the KV cache, [B, S, K, H] per layer.
      seen: [B, V] bool, tokens generated so far (repetition penalty).
      key: the base PRNG key (step i samples with ``fold_in(key, i)``).
    """

    step: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    logits: jax.Array
    positions: jax.Array
    key_valid: jax.Array
    cache: KVCache
    seen: jax.Array
    key: jax.Array


@struct.dataclass
class GenerationOutput:
    """``tokens [B, N]`` int32 (zeros after each row's end) and ``lengths [B]`` int32 (stop token included)."""

    tokens: jax.Array
    lengths: jax.Array


# ---------------------------------------------------------------------------------------- building blocks


def _prompt_embeddings(model, ids, features, feature_index):
    x = model.llm.embed(ids)
    return x if features is None else place_features(x, features, feature_index)


def _prefill(model, ids, mask, features, feature_index, num_new: int):
    """Runs the prompt ``ids [B, T]`` (mask [B, T]) into a fresh cache of T + num_new slots.

    Returns (last-position logits [B, V] float32, cache, key_valid [B, S], next positions [B]).
    """
    b, t = ids.shape
    llm = model.llm
    cache = KVCache.zeros(llm.config, b, t + num_new, llm.dtype)
    if model.mesh is not None:  # created inside jit: say where its shards live (batch / KV heads)
        cache = sharding.constrain_kv_cache(cache, model.mesh, model.rules)
    key_valid = jnp.zeros((b, t + num_new), bool).at[:, :t].set(mask)
    x = _prompt_embeddings(model, ids, features, feature_index)
    hidden, cache = llm.hidden_states(x, positions_from_mask(mask), attention_mask(key_valid, 0, t), cache, 0)
    logits = llm.logits(hidden[:, -1:])[:, 0]
    return logits, cache, key_valid, jnp.sum(mask, axis=-1, dtype=jnp.int32)


def _decode(model, tokens, positions, cache, key_valid, write_index):
    """Feeds ``tokens [B]`` at slot ``write_index`` → (logits [B, V], cache, key_valid)."""
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((key_valid.shape[0], 1), bool),
                                             (0, write_index))
    x = model.llm.embed(tokens[:, None])
    hidden, cache = model.llm.hidden_states(x, positions[:, None], attention_mask(key_valid, write_index, 1),
                                            cache, write_index)
    return model.llm.logits(hidden)[:, 0], cache, key_valid


def _choose(state: DecodeState, params: sampling.SamplingParams, stop_ids, do_sample: bool) -> jax.Array:
    """The next token [B] from ``state.logits`` (processors in HF order, then sample or argmax)."""
    logits = sampling.process_logits(state.logits, state.seen, state.step, params, stop_ids,
                                     do_sample=do_sample)
    if do_sample:
        return sampling.sample(jax.random.fold_in(state.key, state.step), logits)
    return sampling.greedy(logits)


def _advance(model, state: DecodeState, params, stop_ids, max_new_tokens, do_sample: bool) -> DecodeState:
    """Chooses one token per row, records it, and (for rows still running) runs it through the model."""
    token = _choose(state, params, stop_ids, do_sample)
    running = ~state.done
    token = jnp.where(running, token, 0)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    stopped = running & jnp.isin(token, stop_ids)
    step = state.step + 1
    done = state.done | stopped | (step >= max_new_tokens)
    seen = sampling.update_seen(state.seen, token)
    t = state.key_valid.shape[1] - state.tokens.shape[1]
    logits, cache, key_valid = _decode(model, token, state.positions, state.cache, state.key_valid, t + state.step)
    return state.replace(step=step, tokens=tokens, lengths=state.lengths + running.astype(jnp.int32),
                         done=done, logits=logits, positions=state.positions + 1, key_valid=key_valid,
                         cache=cache, seen=seen)


def _initial_state(model, ids, mask, features, feature_index, key, num_new: int, row_valid) -> DecodeState:
    logits, cache, key_valid, positions = _prefill(model, ids, mask, features, feature_index, num_new)
    b = ids.shape[0]
    return DecodeState(
        step=jnp.zeros((), jnp.int32), tokens=jnp.zeros((b, num_new), jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32), done=~row_valid, logits=logits, positions=positions,
        key_valid=key_valid, cache=cache, seen=jnp.zeros(logits.shape, bool), key=key)


# ---------------------------------------------------------------------------------------- jitted programs


@functools.partial(jax.jit, static_argnames=("graphdef", "do_sample", "num_new"))
def _generate(graphdef, params_state, ids, mask, features, feature_index, row_valid, sampling_params,
              stop_ids, max_new_tokens, key, *, do_sample: bool, num_new: int) -> GenerationOutput:
    """Greedy or sampling: prefill, then one while_loop until every row stopped or max_new_tokens."""
    model = nnx.merge(graphdef, params_state)
    state = _initial_state(model, ids, mask, features, feature_index, key, num_new, row_valid)
    state = jax.lax.while_loop(
        lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
        lambda s: _advance(model, s, sampling_params, stop_ids, max_new_tokens, do_sample),
        state)
    return GenerationOutput(tokens=state.tokens, lengths=state.lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams"))
def _beam_generate(graphdef, params_state, ids, mask, features, feature_index, row_valid, sampling_params,
                   beam_params, *, num_beams: int) -> GenerationOutput:
    """Beam search (HF semantics, :mod:`minicpmv_jax.beam_search`): rows B·W, beam-major per batch row.

    The prompt is prefilled once per batch row and its cache copied to the row's W beams; after each
    step the cache and the ``seen`` mask follow their beams (``beam_idx``).
    """
    model = nnx.merge(graphdef, params_state)
    b, t = ids.shape
    num_new = beam_params.length_norm.shape[0] - 1
    logits, cache, key_valid, positions = _prefill(model, ids, mask, features, feature_index, num_new)
    logits, cache, key_valid, positions = beam_search.expand_beams((logits, cache, key_valid, positions),
                                                                   num_beams)
    state = beam_search.init(beam_params, b, num_beams, active=row_valid)
    stop_ids = beam_params.stop_ids

    def body(carry):
        state, logits, cache, key_valid, positions, seen = carry
        step = state.step
        log_probs = sampling.beam_log_probs(logits, seen, step, sampling_params, stop_ids)
        state, token, beam_idx = beam_search.step(state, log_probs)
        cache, seen = beam_search.gather_beams((cache, seen), beam_idx)
        seen = sampling.update_seen(seen, token)
        logits, cache, key_valid = _decode(model, token, positions, cache, key_valid, t + step)
        return state, logits, cache, key_valid, positions + 1, seen

    seen = jnp.zeros(logits.shape, bool)
    state, *_ = jax.lax.while_loop(lambda c: ~beam_search.done(c[0]), body,
                                   (state, logits, cache, key_valid, positions, seen))
    tokens, lengths, _ = beam_search.finalize(state)
    return GenerationOutput(tokens=tokens, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_new"))
def _prefill_jit(graphdef, params_state, ids, mask, features, feature_index, row_valid, key, *, num_new: int):
    model = nnx.merge(graphdef, params_state)
    return _initial_state(model, ids, mask, features, feature_index, key, num_new, row_valid)


@functools.partial(jax.jit, static_argnames=("graphdef", "do_sample"), donate_argnames=("state",))
def _step_jit(graphdef, params_state, state, sampling_params, stop_ids, max_new_tokens, *, do_sample: bool):
    model = nnx.merge(graphdef, params_state)
    return _advance(model, state, sampling_params, stop_ids, max_new_tokens, do_sample)


# ---------------------------------------------------------------------------------------- public API


def generate(model, ids, mask, features, feature_index, row_valid, *, strategy: str, sampling_params: Any,
             stop_ids, max_new_tokens: int, num_new: int, num_beams: int = 1, length_penalty: float = 1.0,
             seed: int = 0) -> GenerationOutput:
    """Generates for a padded batch in one compiled call.

    Args:
      model: a :class:`~minicpmv_jax.model.MiniCPMV`.
      ids, mask: the left-padded prompt ``[B, T]`` (int32, bool); T and B bucketed by the caller.
      features, feature_index: image features ``[N, Q, D]`` and their slots ``[B, T]`` (−1 elsewhere), or
        None for a text-only batch.
      row_valid: [B] bool, False for padding rows (they are done from the start).
      strategy: ``"greedy"``, ``"sample"`` or ``"beam"``.
      sampling_params: :class:`minicpmv_jax.sampling.SamplingParams` (repetition penalty and
        min_new_tokens act in every strategy; temperature / top-k / top-p only when sampling).
      stop_ids: token ids that end a row.
      max_new_tokens: tokens to generate at most (≤ num_new).
      num_new: N, the static size of the output buffer (bucketed by the caller).
      num_beams, length_penalty: beam search only.
      seed: PRNG seed of sampling.

    Returns:
      Tokens ``[B, N]`` and lengths ``[B]``; row b generated ``tokens[b, :lengths[b]]`` (its stop token last,
      if it stopped).
    """
    if strategy not in ("greedy", "sample", "beam"):
        raise ValueError(f"strategy must be 'greedy', 'sample' or 'beam', got {strategy!r}")
    if not 1 <= max_new_tokens <= num_new:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, num_new={num_new}]")
    graphdef, params_state = nnx.split(model)
    if strategy == "beam":
        beam_params = beam_search.BeamParams.make(max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids),
                                                  length_penalty=length_penalty, capacity=num_new)
        return _beam_generate(graphdef, params_state, ids, mask, features, feature_index, row_valid,
                              sampling_params, beam_params, num_beams=num_beams)
    return _generate(graphdef, params_state, ids, mask, features, feature_index, row_valid, sampling_params,
                     jnp.asarray(stop_ids, jnp.int32), jnp.asarray(max_new_tokens, jnp.int32),
                     jax.random.key(seed), do_sample=strategy == "sample", num_new=num_new)


def prefill(model, ids, mask, features, feature_index, row_valid, *, num_new: int, seed: int = 0) -> DecodeState:
    """The prompt into a fresh cache: the state from which :func:`decode_step` produces tokens one by one."""
    graphdef, params_state = nnx.split(model)
    return _prefill_jit(graphdef, params_state, ids, mask, features, feature_index, row_valid,
                        jax.random.key(seed), num_new=num_new)


def decode_step(model, state: DecodeState, *, sampling_params: Any, stop_ids, max_new_tokens: int,
                do_sample: bool) -> DecodeState:
    """One token per row (the same maths as one iteration of :func:`generate`'s loop); ``state`` is donated."""
    graphdef, params_state = nnx.split(model)
    return _step_jit(graphdef, params_state, state, sampling_params, jnp.asarray(stop_ids, jnp.int32),
                     jnp.asarray(max_new_tokens, jnp.int32), do_sample=do_sample)
