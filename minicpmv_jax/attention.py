"""Scaled dot-product attention: the one core that all three towers call, its masks and its kernels.

Shape letters: see :mod:`minicpmv_jax.layers`. Which keys a query may see is a :class:`Mask`: the keys'
validity ``key_valid [B, S]`` and, for the decoder, the causal rule "query t (written at slot
``causal_offset + t``) sees the slots s ≤ its own". The mask is kept in that form, never as ``[T, S]``,
until a kernel needs it: the dense one builds ``[B, T, S]`` (:func:`causal_mask`, :func:`key_mask`), the
blockwise one builds one ``[bq, bk]`` tile at a time, the platform kernels take lengths or segment ids.

Kernels (``implementation``), all with the same shapes, mask and float32 softmax:

* ``"xla"`` — dense: the ``[B, N, T, S]`` logits in one product (memory O(T·S)). Differentiable; what
  fine-tuning and ``compute_logits`` use.
* ``"blockwise"`` — flash-style in plain JAX, on every backend: a loop over query blocks, in each an
  online softmax over key blocks, skipping the key blocks the causal rule hides (memory O(T)). Forward
  only (its loop has a data-dependent trip count, which reverse-mode differentiation refuses).
* ``"cudnn"`` — ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU; bfloat16 / float16). The
  cuDNN causal mask is aligned top-left, so the prompt's keys are cut to its own T slots and left
  padding is an explicit key mask.
* ``"splash"`` — Pallas splash attention (TPU): per K/V head a multi-query kernel with a causal mask,
  left padding as segment ids. Off TPU it runs in Pallas interpret mode (slow; for tests).
* ``"gpu_decode"`` — the Pallas GPU decode kernel for one query per row: it reads only each row's valid
  slots ``[first valid, causal_offset]``. Off GPU it runs in Pallas interpret mode.

:func:`resolve` turns a user's choice (``"auto"`` or one of the above, :data:`IMPLEMENTATIONS`) into the
kernel of one call, by backend, dtype and phase (decode, prefill, or a full forward without a cache).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import struct

__all__ = [
    "MASK_VALUE",
    "IMPLEMENTATIONS",
    "Mask",
    "causal_mask",
    "key_mask",
    "resolve",
    "attention",
]

# Logit of a masked key: the default mask value of JAX's Pallas splash attention. Finite, so a query row
# whose keys are all masked (a left-padding position, an empty padding piece) gives a uniform softmax
# (finite, meaningless values) instead of NaN; -inf would give NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

#: What a model may be asked to use (``attention=`` of ``MiniCPMVModel`` / ``from_pretrained``).
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash", "gpu_decode")
_KERNELS = IMPLEMENTATIONS[1:]

#: Block sizes of the blockwise kernel (queries, keys); a block shorter than the sequence is cut to it.
BLOCK_Q = 512
BLOCK_KV = 512
#: "auto" prefills with the blockwise kernel from this many queries on (on CPU and as the GPU's float32
#: fallback); below, the dense kernel is as fast (benchmarks/long_context.py: 1.06× at 1024 tokens) and
#: its program compiles faster (no loops).
BLOCKWISE_MIN_QUERIES = 1024


# ---------------------------------------------------------------------------------------------- masks


@struct.dataclass
class Mask:
    """Which keys each query may see, without materialising ``[T, S]``.

    Attributes:
      key_valid: ``[B, S]`` bool, the slots that hold real keys; None: every slot.
      causal_offset: None (every query sees every valid key: the encoders), or the slot of query 0: query
        t sees the slots s ≤ causal_offset + t (the decoder; 0 for a prefill or a full forward, the write
        index for a decode step). A Python int, a ``[]`` int array, or ``[B]`` for one offset per row
        (rows at different positions, as the decode slots of a serving engine are).
    """

    key_valid: jax.Array | None = None
    causal_offset: Any = None

    def dense(self, num_queries: int) -> jax.Array | None:
        """The mask as the dense kernel takes it: ``[B, T, S]`` (causal), ``[B, 1, S]`` or None."""
        if self.causal_offset is None:
            return key_mask(self.key_valid)
        if self.key_valid is None:
            raise ValueError("a causal Mask needs key_valid (its length gives S)")
        return causal_mask(self.key_valid, self.causal_offset, num_queries)


def causal_mask(key_valid: jax.Array, write_index: jax.Array, num_queries: int) -> jax.Array:
    """Causal mask ``[B, T, S]`` for ``T = num_queries`` queries written at slots ``[write_index,
    write_index + T)``: query t sees the slots s ≤ write_index + t that ``key_valid [B, S]`` marks real.
    ``write_index`` is one slot (``[]``) or one per row (``[B]``)."""
    s = jnp.arange(key_valid.shape[-1])
    q = _query_slots(write_index, num_queries, key_valid.shape[0])                      # [B, T]
    return (s[None, None, :] <= q[:, :, None]) & key_valid[:, None, :].astype(bool)


def _query_slots(offset, num_queries: int, batch: int) -> jax.Array:
    """Slot of every query, ``[B, T]``: ``offset + t`` with ``offset`` one slot or one per row."""
    offset = jnp.asarray(offset, jnp.int32)
    return jnp.broadcast_to(offset.reshape(-1, 1), (batch, 1)) + jnp.arange(num_queries, dtype=jnp.int32)[None, :]


def key_mask(key_valid: jax.Array | None) -> jax.Array | None:
    """Key padding ``key_valid [B, S]`` as a mask ``[B, 1, S]``: every query sees the valid keys.
    None (every key valid) stays None."""
    return None if key_valid is None else key_valid[:, None, :].astype(bool)


def _starts_at_zero(mask: Mask | None) -> bool:
    """Whether ``mask`` is causal from slot 0, known before tracing (a prefill or a full forward)."""
    offset = None if mask is None else mask.causal_offset
    return isinstance(offset, int) and not isinstance(offset, bool) and offset == 0


# ------------------------------------------------------------------------------------------ choosing


def resolve(implementation: str, *, num_queries: int, cached: bool, dtype: Any,
            backend: str | None = None, sharded: bool = False) -> str:
    """The kernel of one call for a user's ``implementation`` (one of :data:`IMPLEMENTATIONS`).

    ``"auto"``: a decode step (one query) runs ``"gpu_decode"`` on GPU and ``"xla"`` elsewhere; a prefill
    (several queries into a cache) runs ``"cudnn"`` on GPU for bfloat16 / float16 (``"blockwise"`` for
    float32, which cuDNN does not take), ``"splash"`` on TPU and ``"blockwise"`` elsewhere — the
    blockwise kernel from :data:`BLOCKWISE_MIN_QUERIES` queries on, ``"xla"`` below; a full forward
    without a cache (``compute_logits``, fine-tuning) runs ``"xla"``, the differentiable kernel.
    An explicit kernel applies to every phase, except that a decode step runs ``"xla"`` unless
    ``"gpu_decode"`` was asked for (the prefill kernels are for many queries), and ``"gpu_decode"``
    asked for leaves prefills to ``"xla"``.

    ``sharded`` (the program runs on a mesh of several devices): ``"auto"`` then keeps to the kernels
    XLA partitions itself (``"xla"``, ``"blockwise"``, ``"cudnn"``); the Pallas kernels would need a
    ``shard_map`` around them, which this package does not add yet.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    backend = backend or jax.default_backend()
    decode = num_queries == 1 and cached
    if implementation == "auto":
        if decode:
            return "gpu_decode" if backend == "gpu" and not sharded else "xla"
        if not cached:
            return "xla"
        blockwise = "blockwise" if num_queries >= BLOCKWISE_MIN_QUERIES else "xla"
        if backend == "gpu":
            return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else blockwise
        return "splash" if backend == "tpu" and not sharded else blockwise
    if implementation == "gpu_decode":
        return "gpu_decode" if decode else "xla"
    return "xla" if decode else implementation


# ----------------------------------------------------------------------------------------------- core


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | None = None, *, scale: float | None = None,
              implementation: str = "xla", loop_heads_on_cpu: bool = False) -> jax.Array:
    """Grouped-query softmax attention, logits and softmax in float32.

    ``q [B, T, N, H]``, ``k, v [B, S, K, H]``, ``mask`` a :class:`Mask` (None: every key) →
    ``[B, T, N, H]`` in v's dtype. ``N = K·G``: query head n uses K/V head n // G; ``K == N`` is plain
    multi-head attention. ``scale`` multiplies the logits (default ``H ** -0.5``). A query row with
    every key masked gives finite garbage (:data:`MASK_VALUE`). ``implementation``: one kernel of
    :data:`IMPLEMENTATIONS` (not ``"auto"``: see :func:`resolve`); the kernels agree to float32 rounding.

    The dense kernel lays the queries out ``[B, K, G, T, H]`` before the products (and the result comes
    back from ``[B, K, G, T, H]``), so that every product, forward and backward, runs on ``(G, T)`` as one
    row axis of the ``[B, K, G·T, S]`` logits: with the queries left ``[B, T, K, G, H]`` XLA transposed
    the logit-sized tensors (``[B, K, T, G, S]`` and ``[B, K, S, T, G]`` copies) in the backward pass and
    the probabilities in the forward instead of the query-sized ones (on CPU at
    ``benchmarks/train_cpu.py``'s shapes, 2 cores: forward + backward 22.5 → 17.5 ms, forward alone
    12.4 → 7.3 ms).

    Its schedule: by default every (batch row, K/V head) group in one batched product. With
    ``loop_heads_on_cpu`` (the vision encoder and the resampler) the platform decides at lowering: on CPU
    one group per step of a loop over the ``B·K`` groups, so the ``[G·T, S]`` logits of one group (4 MB
    for one head of a 1024-patch piece) stay in cache through the softmax and the second product;
    materialising all of them (``[B, N, T, S]``, 671 MB for 10 pieces) made attention 2–3× slower there
    (``benchmarks/vision_cpu.py``). Elsewhere the batched product.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if implementation not in _KERNELS:
        raise ValueError(f"attention kernel must be one of {_KERNELS}, got {implementation!r}")
    if implementation == "blockwise":
        return _attention_blockwise(q, k, v, mask, scale)
    if implementation == "cudnn":
        return _attention_dot_product(q, k, v, mask, scale, "cudnn")
    if implementation == "splash":
        return _attention_splash(q, k, v, mask, scale)
    if implementation == "gpu_decode":
        return _attention_gpu_decode(q, k, v, mask, scale)
    dense = None if mask is None else mask.dense(q.shape[1])
    if not loop_heads_on_cpu:
        return _attention_batched(q, k, v, dense, scale)
    return jax.lax.platform_dependent(q, k, v, dense, cpu=functools.partial(_attention_per_group, scale=scale),
                                      default=functools.partial(_attention_batched, scale=scale))


# ------------------------------------------------------------------------------------------ dense (xla)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
            logits_eq: str, out_eq: str) -> jax.Array:
    """The maths, for either schedule: ``logits_eq`` gives the q·k product, ``out_eq`` the product of the
    probabilities with v, and ``mask`` (or None) broadcasts against the logits."""
    logits = jnp.einsum(logits_eq, q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum(out_eq, probs, v)


def _attention_batched(q, k, v, mask, scale):
    """Every (batch row, K/V head) group in one batched product."""
    qg = rearrange(q, "B T (K G) H -> B K G T H", K=k.shape[2])
    mask = None if mask is None else mask[:, None, None, :, :]                         # [B, 1, 1, T|1, S]
    out = _attend(qg, k, v, mask, scale, "BKGTH,BSKH->BKGTS", "BKGTS,BSKH->BKGTH")
    return rearrange(out, "B K G T H -> B T (K G) H")


def _attention_per_group(q, k, v, mask, scale):
    """One (batch row, K/V head) group per step of a loop over the ``B·K`` groups. In a step the group's
    ``G·T`` query rows are one row axis and the products carry no batch axes (``"TH,SH->TS"`` with T
    standing for those rows): XLA:CPU then multiplies the operands as they lie, where unit batch axes
    made it transpose k in every step."""
    b, kv_heads = k.shape[0], k.shape[2]
    groups = q.shape[2] // kv_heads
    qs = rearrange(q, "B T (K G) H -> (B K) (G T) H", K=kv_heads)                        # [B·K, G·T, H]
    ks = rearrange(k, "B S K H -> (B K) S H")                                            # [B·K, S, H]
    vs = rearrange(v, "B S K H -> (B K) S H")
    masks = None
    if mask is not None:
        if mask.shape[1] > 1:
            mask = jnp.tile(mask, (1, groups, 1))                                        # [B, G·T, S]
        masks = jnp.repeat(mask, kv_heads, axis=0)                                       # [B·K, G·T|1, S]
    out = jax.lax.map(lambda a: _attend(*a, scale, "TH,SH->TS", "TS,SH->TH"),
                      (qs, ks, vs, masks))                                               # [B·K, G·T, H]
    return rearrange(out, "(B K) (G T) H -> B T (K G) H", B=b, G=groups)


# ------------------------------------------------------------------------------------------- blockwise


def _attention_blockwise(q, k, v, mask: Mask | None, scale: float, block_q: int = BLOCK_Q,
                         block_kv: int = BLOCK_KV) -> jax.Array:
    """Flash-style attention: per query block an online softmax over the key blocks it may see.

    Queries ``[B, K, G, bq, H]`` per block; per key block the ``[B, K, G, bq, bk]`` float32 logits, the
    running maximum ``m`` and denominator ``l`` ``[B, K, G, bq]`` and the unnormalised output ``acc``
    ``[B, K, G, bq, H]`` (float32), rescaled by ``exp(m_old − m_new)`` when the maximum grows. With a
    causal mask the loop stops at the last key block that holds a slot ≤ the block's last query slot.
    T is padded up to whole query blocks (padded queries dropped); the keys are read in place, the last
    block overlapping the one before it with the overlap masked.
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_kv, s)
    tp = _round_up(t, bq)
    key_valid = jnp.ones((b, s), bool) if mask is None or mask.key_valid is None else mask.key_valid.astype(bool)
    offset = None if mask is None else mask.causal_offset
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))                                  # queries: O(T), cheap
    num_kv = _round_up(s, bk) // bk
    qb = rearrange(q, "B (I t) (K G) H -> I B K G t H", t=bq, K=kv_heads)                 # per query block
    stats = qb.shape[1:5]                                                                  # [B, K, G, bq]

    def keys(j):
        """Key block j read in place (no padded copy of the cache): the last block starts at S − bk, and
        its slots before j·bk, which the previous block counted, are masked."""
        start = jnp.minimum(j * bk, s - bk)
        k_j = rearrange(jax.lax.dynamic_slice_in_dim(k, start, bk, axis=1), "B s K H -> B K s H")
        v_j = rearrange(jax.lax.dynamic_slice_in_dim(v, start, bk, axis=1), "B s K H -> B K s H")
        slot = start + jnp.arange(bk)
        fresh = jax.lax.dynamic_slice_in_dim(key_valid, start, bk, axis=1) & (slot >= j * bk)[None, :]
        return k_j, v_j, slot, fresh

    def query_block(args):
        i, qi = args
        q_slot = i * bq + _query_slots(0 if offset is None else offset, bq, b)             # [B, bq]

        def key_block(j, carry):
            m, l, acc = carry
            k_j, v_j, k_slot, fresh = keys(j)
            logits = jnp.einsum("BKGtH,BKsH->BKGts", qi, k_j, preferred_element_type=jnp.float32) * scale
            seen = fresh[:, None, None, None, :]                                           # [B, 1, 1, 1, bk]
            if offset is not None:
                seen = seen & (k_slot[None, None, None, None, :] <= q_slot[:, None, None, :, None])
            logits = jnp.where(seen, logits, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            p = jnp.exp(logits - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            l = rescale * l + jnp.sum(p, axis=-1)
            acc = rescale[..., None] * acc + jnp.einsum("BKGts,BKsH->BKGtH", p.astype(v.dtype), v_j,
                                                        preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full(stats, MASK_VALUE, jnp.float32), jnp.zeros(stats, jnp.float32),
                jnp.zeros((*stats, h), jnp.float32))
        stop = num_kv if offset is None else jnp.clip(jnp.max(q_slot[:, -1]) // bk + 1, 0, num_kv)
        _, l, acc = jax.lax.fori_loop(0, stop, key_block, init)
        return (acc / l[..., None]).astype(v.dtype)

    out = jax.lax.map(query_block, (jnp.arange(tp // bq), qb))                            # [I, B, K, G, bq, H]
    return rearrange(out, "I B K G t H -> B (I t) (K G) H")[:, :t]


# ------------------------------------------------------------------------------------ platform kernels


def _prompt_keys(k, v, mask: Mask | None, t: int, kernel: str):
    """For a kernel whose causal mask is aligned top-left: the keys of a prefill from slot 0 cut to the
    prompt's own T slots (a query never sees a later slot), with their validity ``[B, T]``; the keys as
    they are for a bidirectional mask."""
    key_valid = None if mask is None else mask.key_valid
    if mask is None or mask.causal_offset is None:
        return k, v, key_valid, False
    if not _starts_at_zero(mask):
        raise ValueError(f"attention kernel {kernel!r} takes a causal mask from slot 0 (a prefill), not a "
                         "decode step or a chunk at another offset; use 'xla' or 'blockwise' there")
    if k.shape[1] < t:
        raise ValueError(f"{t} queries from slot 0 need ≥ {t} key slots, got {k.shape[1]}")
    return k[:, :t], v[:, :t], None if key_valid is None else key_valid[:, :t], True


def _attention_dot_product(q, k, v, mask: Mask | None, scale: float, implementation: str | None):
    """``jax.nn.dot_product_attention`` (``implementation="cudnn"`` on GPU; None / ``"xla"`` runs the same
    call on any backend, which is how its masks are tested on CPU). GQA as the function takes it.

    cuDNN takes padding only as sequence lengths (valid tokens first), and its causal mask is aligned
    top-left. A prefill's left-padded rows are therefore rotated so that each row's valid tokens come
    first (attention sees only their order: RoPE is already applied), run with per-row lengths and
    ``is_causal``, and rotated back; the padding rows' outputs are garbage, as everywhere. A
    bidirectional key mask is passed whole, ``[B, 1, T, S]`` (cuDNN's bias needs the query length)."""
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention 'cudnn' needs a GPU; this backend is {jax.default_backend()} "
                             "(use 'auto', 'blockwise' or 'xla')")
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention 'cudnn' takes bfloat16 or float16, got {q.dtype} (load the model "
                             "with dtype='bfloat16', or use 'blockwise')")
    k, v, key_valid, causal = _prompt_keys(k, v, mask, q.shape[1], "cudnn")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if key_valid is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=implementation).astype(v.dtype)
    if not causal:   # any key mask, as cuDNN takes it: full [B, 1, T, S] (the encoders' lengths are short)
        dense = jnp.broadcast_to(key_valid[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale,
                                            implementation=implementation).astype(v.dtype)
    lengths = jnp.sum(key_valid, axis=1, dtype=jnp.int32)                                # [B]
    pad = q.shape[1] - lengths                                                           # left padding per row
    rotate = jax.vmap(lambda x, shift: jnp.roll(x, shift, axis=0))
    q, k, v = (rotate(x, -pad) for x in (q, k, v))                                       # valid tokens first
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return rotate(out, pad).astype(v.dtype)


def _attention_splash(q, k, v, mask: Mask | None, scale: float):
    """Pallas splash attention: per batch row and K/V head one multi-query kernel over its G query heads,
    with a causal (or full) mask and the key padding as segment ids (padding 0, real 1; a padding query
    then sees padding keys, never an empty row). Lengths are padded to whole 128-lane tiles (the
    kernel's unit) with padding segments. Interpret mode off TPU."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q.shape
    k, v, key_valid, causal = _prompt_keys(k, v, mask, t, "splash")
    s, kv_heads = k.shape[1], k.shape[2]
    groups = n // kv_heads
    if key_valid is None:
        key_valid = jnp.ones((b, s), bool)
    query_valid = key_valid if causal else jnp.ones((b, t), bool)
    tp, sp = _round_up(t, _LANES), _round_up(s, _LANES)
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (k, v))
    key_segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, sp - s)))
    query_segments = jnp.pad(query_valid.astype(jnp.int32), ((0, 0), (0, tp - t)))
    one = masks.CausalMask((tp, sp)) if causal else masks.FullMask((tp, sp))
    block_q, block_kv = _splash_block(tp), _splash_block(sp)
    blocks = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv)
    kernel = splash.make_splash_mqa_single_device(masks.MultiHeadMask([one] * groups), block_sizes=blocks,
                                                  interpret=jax.default_backend() != "tpu")
    qs = rearrange(q * jnp.asarray(scale, q.dtype), "B T (K G) H -> B K G T H", K=kv_heads)
    ks, vs = (rearrange(x.astype(q.dtype), "B S K H -> B K S H") for x in (k, v))

    def row(qr, kr, vr, q_seg, kv_seg):
        ids = splash.SegmentIds(q=q_seg, kv=kv_seg)
        return jax.vmap(lambda a, c, d: kernel(a, c, d, segment_ids=ids))(qr, kr, vr)    # over K

    out = jax.vmap(row)(qs, ks, vs, query_segments, key_segments)                          # [B, K, G, T', H]
    return rearrange(out, "B K G T H -> B T (K G) H")[:, :t].astype(v.dtype)


_LANES = 128   # splash attention's tile width: its block sizes are multiples of it


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _largest_power_of_two_dividing(n: int, cap: int) -> int:
    """The largest power of two ≤ ``cap`` that divides ``n``."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def _splash_block(length: int) -> int:
    """The largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(size for size in (512, 256, _LANES) if length % size == 0)


def _attention_gpu_decode(q, k, v, mask: Mask | None, scale: float):
    """The Pallas GPU decode kernel (``jax.experimental.pallas.ops.gpu.decode_attention.gqa``): one query
    per row reads only its slots ``[first valid, causal_offset]`` (a left-padded prompt followed by the
    generated tokens is one contiguous run). Interpret mode off GPU."""
    from jax.experimental.pallas.ops.gpu import decode_attention

    if q.shape[1] != 1 or mask is None or mask.causal_offset is None or mask.key_valid is None:
        raise ValueError("attention 'gpu_decode' takes one query per row with a causal mask and key_valid "
                         "(a decode step)")
    b, s = mask.key_valid.shape
    start = jnp.argmax(mask.key_valid, axis=1).astype(jnp.int32)                           # first valid slot
    end = jnp.broadcast_to(jnp.asarray(mask.causal_offset, jnp.int32) + 1, (b,))
    if s % 16:   # Triton's blocks are powers of two ≥ 16: pad the slots (past `end`, never read)
        extra = _round_up(s, 16) - s
        k, v = (jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) for x in (k, v))
        s += extra
    block_k = _largest_power_of_two_dividing(s, 128)
    k_splits = _largest_power_of_two_dividing(s // block_k, 16)
    out = decode_attention.gqa(q[:, 0], k.astype(q.dtype), v.astype(q.dtype), start_idx=start, kv_seq_len=end,
                               sm_scale=scale, block_k=block_k, k_splits=k_splits,
                               interpret=jax.default_backend() != "gpu")
    return out[:, None].astype(v.dtype)
