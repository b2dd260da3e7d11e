"""The decode slots of the serving engine: their device state and the three compiled programs over it.

A fixed number of slots B (``max_batch``) share one contiguous KV cache ``[B, S, K, H]`` per layer,
allocated once (S = ``max_len``). Each slot holds one request at a time; everything that differs between
requests is an array with one row per slot (:class:`Slots`), so one compiled decode step serves every
mix of requests:

* :func:`prefill_chunk` — one chunk of one prompt (``[1, C]`` tokens at a traced offset) into a staging
  cache ``[1, T, K, H]`` of the prompt's own bucketed length T. A long prompt (a 64-frame video) is
  prefilled chunk by chunk, and the engine runs a decode step for the other slots between chunks.
* :func:`insert` — a finished prefill into a free slot: its staged keys and values, the last position's
  logits, and the request's sampling parameters, PRNG key, stop ids and token budget.
* :func:`decode_step` — every slot chooses its next token (greedy or sampled, with its own parameters)
  and feeds it through the model at its own cache slot. Free slots ride along (a fixed shape) and are
  ignored.

Slot layout: a prompt padded on the left to T tokens lands in slots ``[0, T)`` of its row exactly as the
compiled loop of :mod:`minicpmv_jax.generate` holds it (so a request's numbers are those of ``chat``),
unless T + max_new_tokens would not fit in S; then it is shifted left over its own padding, by as much
as needed. The i-th generated token is fed at slot ``write_index``: the prompt's end plus i.

Shape letters as in ``layers.py``; B here is the number of slots, S the cache length, E stop ids per
slot, V the vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from minicpmv_jax import kv_cache, sampling, sharding
from minicpmv_jax.attention import Mask
from minicpmv_jax.generate import prompt_embeddings
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.qwen2 import positions_from_mask

__all__ = ["Slots", "StepOutput", "empty_slots", "embed_prompt", "prefill_chunk", "insert", "decode_step",
           "MAX_STOP_IDS"]

#: Stop ids a slot holds (padded with −1).
MAX_STOP_IDS = 8


@struct.dataclass
class Slots:
    """The device state of all decode slots, one row per slot.

    Attributes:
      cache: the KV cache, ``[B, S, K, H]`` per layer.
      key_valid: ``[B, S]`` bool, which cache slots hold real tokens of the slot's request.
      write_index: ``[B]`` int32, the cache slot the next token is fed at.
      positions: ``[B]`` int32, the position id of the next token.
      logits: ``[B, V]`` float32, the next-token logits (from the prefill or the last step).
      seen: ``[B, V]`` bool, tokens generated so far (repetition penalty).
      generated: ``[B]`` int32, tokens generated so far.
      active: ``[B]`` bool, the slot holds a running request.
      params: per-slot sampling parameters (``[B]`` arrays, :class:`~minicpmv_jax.sampling.SamplingParams`).
      do_sample: ``[B]`` bool, sample (else greedy).
      stop_ids: ``[B, E]`` int32, −1 padded.
      max_new: ``[B]`` int32, the token budget.
      key: ``[B, 2]`` uint32, raw PRNG key data (token i samples with ``fold_in(key, i)``).
    """

    cache: KVCache
    key_valid: jax.Array
    write_index: jax.Array
    positions: jax.Array
    logits: jax.Array
    seen: jax.Array
    generated: jax.Array
    active: jax.Array
    params: sampling.SamplingParams
    do_sample: jax.Array
    stop_ids: jax.Array
    max_new: jax.Array
    key: jax.Array


@struct.dataclass
class StepOutput:
    """What the host reads after a step: ``token [B]`` int32 chosen per slot (0 for idle slots) and
    ``done [B]`` bool, the slot's request ended with this token (a stop id, its budget, or a full cache)."""

    token: jax.Array
    done: jax.Array


def _slot_shardings(slots: Slots, mesh, rules) -> Slots:
    """Where each array of the (abstract) state lives on ``mesh``: the cache by ``CACHE_AXES``, the rest
    replicated (a few numbers per slot)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = jax.tree.map(lambda _: replicated, slots)
    return placed.replace(cache=kv_cache.shardings(slots.cache, mesh, rules))


def empty_slots(model, num_slots: int, length: int, rules: sharding.Rules = sharding.RULES) -> Slots:
    """All slots free: a zero cache of ``length`` slots per row, on the model's mesh if it has one."""
    cfg = model.config.llm
    vocab = cfg.vocab_size

    def build() -> Slots:
        b = num_slots
        zeros_i = jnp.zeros((b,), jnp.int32)
        params = sampling.SamplingParams.stack([sampling.SamplingParams.make()] * b)
        return Slots(cache=KVCache.zeros(cfg, b, length, model.llm.dtype), key_valid=jnp.zeros((b, length), bool),
                     write_index=zeros_i, positions=zeros_i, logits=jnp.zeros((b, vocab), jnp.float32),
                     seen=jnp.zeros((b, vocab), bool), generated=zeros_i, active=jnp.zeros((b,), bool),
                     params=params, do_sample=jnp.zeros((b,), bool),
                     stop_ids=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32), max_new=zeros_i,
                     key=jnp.zeros((b, 2), jnp.uint32))

    mesh = model.mesh
    if mesh is None:
        return jax.jit(build)()
    return jax.jit(build, out_shardings=_slot_shardings(jax.eval_shape(build), mesh, rules))()


# ---------------------------------------------------------------------------------------- prefill


@functools.partial(jax.jit, static_argnames=("graphdef", "context"))
def embed_prompt(graphdef, params, ids, features, feature_index, *, context: sharding.ShardingContext):
    """ids ``[1, T]`` (and image features) → the prompt's embeddings ``[1, T, D]``."""
    with sharding.use_mesh(context):
        return prompt_embeddings(nnx.merge(graphdef, params), ids, features, feature_index)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "context"), donate_argnames=("cache",))
def prefill_chunk(graphdef, params, cache: KVCache, x, mask, start, *, chunk: int,
                  context: sharding.ShardingContext):
    """Runs prompt tokens ``[start, start + chunk)`` into the staging cache.

    Args:
      cache: the staging cache ``[1, T, K, H]`` (donated).
      x: the whole prompt's embeddings ``[1, T, D]``; mask ``[1, T]`` bool (left padding False);
        position ids follow from the mask (:func:`~minicpmv_jax.qwen2.positions_from_mask`).
      start: int32 ``[]``, the chunk's first slot; when ``chunk == T`` the prompt runs in one pass from
        slot 0 (the offset static, as in :func:`minicpmv_jax.generate.prefill`).

    Returns:
      (cache, logits ``[1, V]`` float32 of the chunk's last position).
    """
    model = nnx.merge(graphdef, params)
    t = x.shape[1]
    positions = positions_from_mask(mask)
    with sharding.use_mesh(context):
        cache = kv_cache.constrain(cache)
        if chunk == t:
            hidden, cache = model.llm.hidden_states(x, positions, Mask(mask, 0), cache, 0)
        else:
            x_c = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)
            positions_c = jax.lax.dynamic_slice_in_dim(positions, start, chunk, axis=1)
            hidden, cache = model.llm.hidden_states(x_c, positions_c, Mask(mask, start), cache, start)
        return cache, model.llm.logits(hidden[:, -1:])[:, 0]


# ---------------------------------------------------------------------------------------- insert


@functools.partial(jax.jit, donate_argnames=("slots",), static_argnames=("context",))
def insert(slots: Slots, slot, staged: KVCache, mask, logits, shift, params: sampling.SamplingParams,
           do_sample, stop_ids, max_new, key, *, context: sharding.ShardingContext) -> Slots:
    """A prefilled prompt into slot ``slot`` (int32 ``[]``), which starts running it.

    Args:
      staged: the prompt's cache ``[1, T, K, H]``; mask ``[1, T]``; logits ``[1, V]`` (its last position).
      shift: int32 ``[]``, how many leading (padding) slots of the prompt to drop so that it and its
        answer fit the S slots (0 when they fit as they are).
      params: the request's sampling parameters (0-d); do_sample ``[]`` bool; stop_ids ``[E]``;
        max_new ``[]`` int32; key ``[2]`` uint32 PRNG key data.
    """
    s = slots.key_valid.shape[1]
    t = mask.shape[1]
    size = min(t, s)

    def place(buffer, new):
        # Drop `shift` leading slots of `new` [1, T, ...], keep `size` of them, write them at [slot, 0].
        padded = jnp.concatenate([new, jnp.zeros_like(new)], axis=1)
        kept = jax.lax.dynamic_slice_in_dim(padded, shift, size, axis=1).astype(buffer.dtype)
        start = (slot,) + (jnp.zeros((), jnp.int32),) * (buffer.ndim - 1)
        return jax.lax.dynamic_update_slice(buffer, kept, start)

    with sharding.use_mesh(context):
        cache = jax.tree.map(place, slots.cache, staged)
        kept = jax.lax.dynamic_slice_in_dim(jnp.concatenate([mask, jnp.zeros_like(mask)], axis=1), shift, size,
                                            axis=1)
        row_valid = jnp.zeros((s,), bool).at[:size].set(kept[0])
        length = t - shift

        def set_row(field, value):
            return field.at[slot].set(value)

        return slots.replace(
            cache=kv_cache.constrain(cache),
            key_valid=set_row(slots.key_valid, row_valid),
            write_index=set_row(slots.write_index, length),
            positions=set_row(slots.positions, jnp.sum(mask, dtype=jnp.int32)),
            logits=set_row(slots.logits, logits[0]),
            seen=set_row(slots.seen, False),
            generated=set_row(slots.generated, 0),
            active=set_row(slots.active, True),
            params=jax.tree.map(set_row, slots.params, params),
            do_sample=set_row(slots.do_sample, do_sample),
            stop_ids=set_row(slots.stop_ids, stop_ids),
            max_new=set_row(slots.max_new, max_new),
            key=set_row(slots.key, key))


# ---------------------------------------------------------------------------------------- decode


def _choose(slots: Slots) -> jax.Array:
    """Each slot's next token ``[B]`` from its logits: HF's processors, then argmax or a draw."""
    scores = sampling.process_logits(slots.logits, slots.seen, slots.generated, slots.params, slots.stop_ids,
                                     do_sample=False)
    greedy = sampling.greedy(scores)

    def draw(scores):
        warped = sampling.warp(scores, slots.params)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(slots.key), slots.generated)
        # One row at a time, [1, V] as a request alone draws it: a row's draw never depends on the others.
        drawn = jax.vmap(lambda k, s: sampling.sample(k, s[None])[0])(keys, warped)
        return jnp.where(slots.do_sample, drawn, greedy)

    return jax.lax.cond(jnp.any(slots.do_sample & slots.active), draw, lambda _: greedy, scores)


@functools.partial(jax.jit, static_argnames=("graphdef", "context"), donate_argnames=("slots",))
def decode_step(graphdef, params, slots: Slots, release, *, context: sharding.ShardingContext
                ) -> tuple[Slots, StepOutput]:
    """One token for every running slot.

    ``release [B]`` bool frees slots before the step (a cancelled request, or one the host ended on a stop
    string). A slot's request is done when its token is one of its stop ids, when it has generated its
    budget, or when its next write would leave the cache; a done slot is free from the next step on.
    """
    model = nnx.merge(graphdef, params)
    s = slots.key_valid.shape[1]
    with sharding.use_mesh(context):
        active = slots.active & ~release
        token = jnp.where(active, _choose(slots.replace(active=active)), 0)
        generated = slots.generated + active.astype(jnp.int32)
        stopped = jnp.any(token[:, None] == slots.stop_ids, axis=-1)
        done = active & (stopped | (generated >= slots.max_new) | (slots.write_index + 1 >= s))
        seen = sampling.update_seen(slots.seen, jnp.where(active, token, -1))
        # Feed the token at each running slot's own cache slot (idle rows write their last slot, unseen).
        write_index = jnp.where(active, slots.write_index, s - 1)
        rows = jnp.arange(slots.key_valid.shape[0])
        key_valid = slots.key_valid.at[rows, write_index].set(slots.key_valid[rows, write_index] | active)
        x = model.llm.embed(token[:, None])
        hidden, cache = model.llm.hidden_states(x, slots.positions[:, None], Mask(key_valid, write_index),
                                                slots.cache, write_index)
        logits = model.llm.logits(hidden)[:, 0]
        step = active.astype(jnp.int32)
        slots = slots.replace(cache=cache, key_valid=key_valid, write_index=slots.write_index + step,
                              positions=slots.positions + step, logits=logits, seen=seen, generated=generated,
                              active=active & ~done)
    return slots, StepOutput(token=token, done=done)
