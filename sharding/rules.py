"""Logical axis names → mesh axes: the rules table and its resolver (MaxText style, with divisibility).

Every parameter declares logical axes where it is created (``nnx.Param(..., out_sharding=axes)`` in
:mod:`minicpmv_jax.layers`); activations and the KV cache use the names below. :data:`RULES` is an
ORDERED table of ``(logical name, candidate mesh axes)``. :func:`logical_to_spec` walks it top to bottom;
for every dimension carrying the rule's logical name it adds each candidate mesh axis that

  1. exists in the mesh with size > 1,
  2. is not yet used by another dimension of the same array, and
  3. divides the dimension together with the mesh axes already given to it.

Otherwise the candidate is skipped, and later rules may give that mesh axis to another dimension: this
is how the fallbacks below work (e.g. ``heads`` before ``head_dim``, ``vocab`` before ``embed``). Table
order is priority across dimensions, not dimension order. A logical name with no rule at all is an
error (typos must not silently replicate a 7B model); ``None`` in an axes tuple means "replicated".

Why divisibility: in jax 0.10.2 an array that lives across calls must be evenly divisible by its
sharding. Checked on 8 CPU devices with a ``[10, 3]`` array and ``P('t', None)``: ``jax.device_put``,
``jax.jit(in_shardings=...)`` and ``jax.jit(out_shardings=...)`` all raise ``IndivisibleError``
("... should evenly divide the shape"); ``ShapeDtypeStruct(sharding=...)`` is accepted but a later
restore into it would fail the same way. Only ``jax.lax.with_sharding_constraint`` inside jit accepts
an uneven split (XLA pads the dimension, 10 → 16). So parameters and the KV cache must divide evenly,
and activation constraints follow the same rule to avoid padded layouts.

Shapes that decide the fallbacks (MiniCPM-V 2.6): Qwen2-7B has N = 28 query heads, K = 4 KV heads,
H = 128, D = 3584, F = 18944, V = 151666 = 2 × 75833; SigLIP D = 1152, 16 heads of 72, F = 4304, 4900
positions; the resampler has 28 heads of 128. So ``tensor`` ∈ {2, 4} is plain Megatron tensor
parallelism, and ``tensor = 8`` divides neither the query heads, nor the KV heads, nor the vocabulary.

Choices and their cost in decode (one token, per layer, batch B, cache length S, tensor t = 8):

* Attention weights: ``heads`` → tensor when N % t == 0, else ``head_dim`` → tensor (H = 128 divides
  every t up to 128). With t = 8 the q/k/v/o kernels, their biases and the cache are split along H.
  Cost: the q·k contraction runs over the split H, so each layer all-reduces the attention logits
  ``[B, N, S]`` in float32 (112·B·S bytes; 0.46 MB for B = 1, S = 4096), and rotate_half swaps halves
  of q/k between devices (a collective-permute of B·(N+K)·H values). The o-projection and MLP
  all-reduces of ``[B, D]`` are the usual Megatron ones. (Checked in the compiled HLO of the tiny model
  on (1, 1, 8), whose 4 heads do not divide 8 either: per layer one all-reduce of the f32
  ``[B, K, G, T, S]`` logits, collective-permutes from rotate_half, ``[B, T, D]`` all-reduces.)
  Rejected: *replicating the KV heads* — with N = 28 the query heads cannot be split 8 ways either, and
  a replicated cache costs t× the memory (B = 8, S = 32768: 14 GiB per chip instead of 1.75 GiB) and t×
  the HBM traffic per step (2048·B·S bytes per layer instead of 256·B·S), roughly the time the logits
  all-reduce costs, for 8× the memory. *Sequence-sharding the cache* (``cache_length`` → tensor) would
  cut the collectives to ``[B, N]`` softmax statistics, but needs constraints inside the attention (the
  cache write at a dynamic slot of a split axis and the prefill layout change); the rule can be switched
  once the attention code carries them. Recommended for this model: tensor ≤ 4, then fsdp/data.
* KV heads: ``kv_heads`` / ``cache_kv_heads`` → tensor when K % t == 0, else split ``head_dim`` like the
  k/v kernels, so a projection's output already has the cache's layout (no resharding at the write).
  When t divides N but not K (t = 7, 14 for the 8B model; the tiny test model at t = 4), q is split
  by heads and k/v by head_dim: correct, but XLA reshards inside the attention (it logs "Involuntary
  full rematerialization"). Use a tensor size that divides K, or t = 8 where both fall back alike.
* Vocabulary: ``vocab`` → tensor when V % t == 0 (t ∈ {1, 2}), else the embedding and ``lm_head`` split
  ``embed`` by tensor. Decode then all-reduces the ``[B, V]`` logits once per token (not per layer),
  at most twice the all-gather a vocab split would need before sampling anyway.
* ``embed`` / ``vision_embed`` → fsdp (then tensor, only when no other dimension took it): every matrix
  of the three towers has a model-width axis, so fsdp splits all of them. Vectors without a width axis
  (``norm``, q/k/v biases ``[N, H]``, the SigLIP fc1 bias) stay replicated over fsdp (< 0.01 % of the
  parameters).
* ``batch`` / ``cache_batch`` → data, then fsdp (each only when it divides B; B = 1 decode replicates):
  the inputs and outputs of the compiled programs (ids, masks, logits) and the KV cache.
  ``length`` / ``cache_length`` are replicated (no sequence parallelism yet).

The residual stream (``act_batch``, ``length``, ``act_embed``): weights stationary for inference
-----------------------------------------------------------------------------------------------------
The LLM constrains its residual stream ``[B, T, D]`` after the embedding (and after image features are
placed) and after every decoder layer (:meth:`minicpmv_jax.qwen2.Qwen2.hidden_states`, on the model's
mesh; nothing without one). With fsdp, two layouts of a projection ``[B, T, D] × [D, …]`` are possible:

* *weights stationary* (:data:`RULES`, the default): ``act_batch`` → data only, ``act_embed`` → fsdp. The
  activation's D is split like the kernels' D, so each device contracts its own slice of D against the
  kernel pieces it holds and the partial sums are all-reduced (or reduce-scattered): per layer and token
  about (D + 2·K·H + 2·F) / t values cross the links (42 496 for Qwen2-7B, 85 KB in bf16, tensor t = 1).
  No weight ever moves.
* *weights gathered* (:data:`TRAINING_RULES`, classic FSDP / ZeRO-3): ``act_batch`` → data and fsdp,
  ``act_embed`` replicated. Each device works on its own rows with whole layers, all-gathered over fsdp
  just before use: (f − 1) / f of a layer's kernels per layer and step (466 MB per layer in bf16 for
  Qwen2-7B), whatever the number of tokens.

So the gathered layout only pays off above about B·T ≈ 2 700 tokens per data replica and step (466 MB
against 2 × 85 KB per token for a ring all-reduce), i.e. for training and long prefills; decode (B·T = B)
is far below. Measured on the full-size compiled decode step (``benchmarks/sharding_report.py``,
``benchmarks/RESULTS.md``): without any constraint XLA picked a weight-gathering layout on (1, 2, 4) at
B = 8 (112 weight all-gathers per token, ≈ 411 MB bf16 per device, +19 % on the bytes the step reads);
with these rules it moves no weight on any of the five meshes at B = 1 and 8 and (1, 2, 4) B = 8 drops from
341 to 202 collectives and from 440 to 23 MB of link traffic per step. Two details that matter: the
constraint after the embedding alone is not enough (109 weight gathers remain: every layer must re-pin
the layout), and the obvious ``("batch", "length", "act_embed")`` with batch over (data, fsdp) and D
replicated — the training layout — makes decode gather every weight on every fsdp mesh at B = 8
((1, 8, 1): 197 weight all-gathers, 14 GB per device per step in bf16). Hence the separate name
``act_batch``: inputs keep ``batch`` → (data, fsdp), the residual stream follows the layout chosen here.
The embedding table is D-split over fsdp × tensor when tensor does not divide V: its lookup is resharded
once to D over fsdp by the first constraint.

**Which table to use**: :data:`RULES` for inference (``from_pretrained(mesh=…)``, ``chat``, generation,
``compute_logits``): prefill runs with the same layout (cheaper up to ~2 700 prompt tokens per replica,
and it keeps one compiled layout for the cache hand-off). :data:`TRAINING_RULES` for training and other
large-B·T work: ``model.shard(mesh, sharding.TRAINING_RULES)``. The two tables differ only in the two
residual-stream rows, so parameters and the KV cache are placed identically and switching a sharded
model is free (``shard`` leaves parameters that are already in place alone).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from jax.sharding import PartitionSpec

from .mesh import MeshLike, axis_sizes

__all__ = ["Rules", "LOGICAL_AXES", "ACTIVATION_AXES", "RESIDUAL_AXES", "CACHE_AXES", "RULES", "TRAINING_RULES",
           "check_rules", "override_rules", "logical_to_spec", "shards_per_dim", "num_shards", "spec_shard_shape"]

Rules = tuple[tuple[str, tuple[str, ...]], ...]

#: Logical axis names carried by the parameters of the three towers (see ``minicpmv_jax/layers.py``).
LOGICAL_AXES = (
    # language model
    "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
    # vision encoder
    "vision_patch", "vision_pos", "vision_embed", "vision_heads", "vision_head_dim", "vision_mlp",
    # resampler (it also uses "embed", "head_dim" and "vision_embed")
    "resampler_queries", "resampler_heads", "resampler_proj",
    # LoRA adapters (fine-tuning): the rank axis of the A [in..., r] and B [r, out...] matrices
    "lora_rank",
)

#: Logical names for activations (``constrain``): batch, sequence, and the model axes they carry. ``batch``
#: is the batch axis of the compiled programs' inputs and outputs, ``act_batch`` the one of the residual
#: stream inside the model (see "The residual stream" above).
ACTIVATION_AXES = ("batch", "act_batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_head_dim",
                   "act_mlp", "act_vocab")

#: Logical names of the LLM's residual stream ``[B, T, D]``, in that order.
RESIDUAL_AXES = ("act_batch", "length", "act_embed")

#: Logical names of a KV cache buffer ``[B, S, K, H]``, in that order.
CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")

#: The default table (inference): ordered (logical name, candidate mesh axes). Earlier rows win a mesh axis.
RULES: Rules = (
    # inputs / outputs of the compiled programs
    ("batch", ("data", "fsdp")),
    # the residual stream [B, T, D]: weights stationary (decode); see TRAINING_RULES
    ("act_batch", ("data",)),
    ("length", ()),
    ("act_embed", ("fsdp",)),
    # other activations
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_head_dim", ("tensor",)),      # fallback: heads did not divide
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # KV cache [B, S, K, H]
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", ()),
    ("cache_kv_heads", ("tensor",)),
    ("cache_head_dim", ("tensor",)),    # fallback: K = 4 KV heads do not divide tensor = 8
    # parameters: the tensor-parallel axes first ...
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("resampler_heads", ("tensor",)),
    ("vision_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vision_mlp", ("tensor",)),
    ("resampler_proj", ("tensor",)),
    # ... then the fallbacks for heads that do not divide ...
    ("head_dim", ("tensor",)),
    ("vision_head_dim", ("tensor",)),
    # ... then the model width: fsdp always, tensor only if no other dimension took it (vocab fallback)
    ("embed", ("fsdp", "tensor")),
    ("vision_embed", ("fsdp", "tensor")),
    # replicated
    ("norm", ()),
    ("vision_patch", ()),
    ("vision_pos", ()),
    ("resampler_queries", ()),
    ("lora_rank", ()),                  # LoRA A/B: split like their kernel's other axes, rank replicated
)


def check_rules(rules: Rules) -> Rules:
    """Normalises a rules table (a bare string → 1-tuple) and checks its shape; returns it as a tuple."""
    out = []
    for i, row in enumerate(rules):
        if not (isinstance(row, (tuple, list)) and len(row) == 2 and isinstance(row[0], str)):
            raise ValueError(f"rules[{i}] = {row!r}: expected (logical name, mesh axes)")
        name, axes = row
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if not all(isinstance(a, str) for a in axes):
            raise ValueError(f"rules[{i}] = {row!r}: mesh axes must be names")
        out.append((name, axes))
    return tuple(out)


def override_rules(rules: Rules, overrides: Mapping[str, Sequence[str] | str]) -> Rules:
    """``rules`` with the mesh axes of some logical names replaced, order kept (e.g. to compare layouts).

    Raises ``ValueError`` for a name that has no row in ``rules`` (a typo would otherwise change nothing).
    """
    rules = check_rules(rules)
    unknown = set(overrides) - {name for name, _ in rules}
    if unknown:
        raise ValueError(f"override of logical names that have no rule: {sorted(unknown)}")
    return check_rules(tuple((name, overrides.get(name, axes)) for name, axes in rules))


#: Training (and other large-B·T work): the residual stream split by batch over data and fsdp, the model
#: width replicated, so XLA all-gathers each layer's fsdp-split weights (classic FSDP). Parameters and
#: the KV cache are placed exactly as by :data:`RULES`.
TRAINING_RULES: Rules = override_rules(RULES, {"act_batch": ("data", "fsdp"), "act_embed": ()})


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: MeshLike,
                    rules: Rules = RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical ``axes`` and ``shape`` on ``mesh`` (see module doc).

    ``mesh`` is a :class:`jax.sharding.Mesh`, an ``AbstractMesh``, ``{axis: size}`` or ``(d, f, t)``. The
    spec has one entry per dimension: ``None``, a mesh axis name, or a tuple of names (outer first).
    Every split divides its dimension evenly. Raises ``ValueError`` for a length mismatch or a logical
    name that no rule mentions.
    """
    axes, shape = tuple(axes), tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    rules = check_rules(rules)
    known = {name for name, _ in rules}
    unknown = [a for a in axes if a is not None and a not in known]
    if unknown:
        raise ValueError(f"logical axis {unknown[0]!r} (of {axes}) has no rule; add ({unknown[0]!r}, ()) to the "
                         "rules to replicate it, or name mesh axes to split it")
    sizes = axis_sizes(mesh)
    assigned: list[list[str]] = [[] for _ in shape]
    used: set[str] = set()
    for name, candidates in rules:
        dims = [i for i, a in enumerate(axes) if a == name]
        if not dims:
            continue
        for mesh_axis in candidates:
            size = sizes.get(mesh_axis, 1)
            if size == 1 or mesh_axis in used:
                continue
            for i in dims:
                if shape[i] % (math.prod(sizes[a] for a in assigned[i]) * size) == 0:
                    assigned[i].append(mesh_axis)
                    used.add(mesh_axis)
                    break
    return PartitionSpec(*(None if not a else a[0] if len(a) == 1 else tuple(a) for a in assigned))


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def shards_per_dim(spec: PartitionSpec, ndim: int, mesh: MeshLike) -> tuple[int, ...]:
    """How many pieces each of ``ndim`` dimensions is cut into by ``spec`` on ``mesh``."""
    sizes = axis_sizes(mesh)
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return tuple(math.prod(sizes.get(a, 1) for a in _entry_axes(e)) for e in entries)


def num_shards(spec: PartitionSpec, ndim: int, mesh: MeshLike) -> int:
    """Number of distinct pieces an array is cut into (its replication factor is devices / this)."""
    return math.prod(shards_per_dim(spec, ndim, mesh))


def spec_shard_shape(shape: Iterable[int], spec: PartitionSpec, mesh: MeshLike) -> tuple[int, ...]:
    """The shape of one device's piece; every device holds one piece of the same shape (even splits)."""
    shape = tuple(shape)
    per = shards_per_dim(spec, len(shape), mesh)
    for d, (s, p) in enumerate(zip(shape, per)):
        if s % p:
            raise ValueError(f"{spec} splits dimension {d} of {shape} into {p} pieces, which does not divide")
    return tuple(s // p for s, p in zip(shape, per))
