"""THE table from our parameter paths to checkpoint tensor names, shapes and transforms.

Both the HF-folder loader (:mod:`minicpmv_jax.hf_checkpoint`) and the converter (``convert_weights``)
are driven by :func:`entries`; neither knows a tensor name of its own. Every checkpoint tensor that a
config implies is consumed by at least one entry and every parameter is filled by exactly one.
:func:`open_validated` is the one check of an HF folder against a config (the loader's, the converter's
and ``minicpmv-jax info``'s): :func:`expected_tensors`, plus :func:`extra_vision_layers` tolerated.

Our path is the NNX state path inside :class:`minicpmv_jax.model.MiniCPMVModel`, e.g.
``("llm", "layers", 0, "attn", "q", "kernel")``. A transform maps the checkpoint array (PyTorch layout,
``[out, in]`` for a Linear) to ours and back (``inverse``, for exporting).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import MiniCPMVConfig
from .hf_checkpoint import HFCheckpoint
from .quantization import QuantizedEinsum

Path = tuple[str | int, ...]

TOWERS = ("llm", "vpm", "resampler")


# --------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """Identity; subclasses reshape. ``shape(hf_shape)`` gives our shape."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x

    def inverse(self, y: np.ndarray) -> np.ndarray:
        return y

    def shape(self, hf_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self(np.empty(hf_shape, np.int8)).shape)


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """Linear weight ``[out, in]`` → kernel ``[in, out]``."""

    def __call__(self, x):
        return x.T

    def inverse(self, y):
        return y.T


@dataclasses.dataclass(frozen=True)
class SplitHeadsIn(Transform):
    """Projection into heads: weight ``[N·H, D]`` → kernel ``[D, N, H]``."""

    heads: int

    def __call__(self, x):
        return x.T.reshape(x.shape[1], self.heads, -1)

    def inverse(self, y):
        return y.reshape(y.shape[0], -1).T


@dataclasses.dataclass(frozen=True)
class SplitHeadsBias(Transform):
    """Bias ``[N·H]`` → ``[N, H]``."""

    heads: int

    def __call__(self, x):
        return x.reshape(self.heads, -1)

    def inverse(self, y):
        return y.reshape(-1)


@dataclasses.dataclass(frozen=True)
class MergeHeadsOut(Transform):
    """Projection out of heads: weight ``[D, N·H]`` → kernel ``[N, H, D]``."""

    heads: int

    def __call__(self, x):
        return x.T.reshape(self.heads, -1, x.shape[0])

    def inverse(self, y):
        return y.reshape(-1, y.shape[-1]).T


@dataclasses.dataclass(frozen=True)
class ConvToPatchKernel(Transform):
    """Conv2d weight ``[D, C, P, P]`` (stride P) → Dense kernel ``[C·P·P, D]`` over (c, row, col) patches."""

    channels: int
    patch: int

    def __call__(self, x):
        return x.reshape(x.shape[0], -1).T

    def inverse(self, y):
        return y.T.reshape(y.shape[1], self.channels, self.patch, self.patch)


@dataclasses.dataclass(frozen=True)
class Rows(Transform):
    """Rows ``[start, stop)`` of a packed tensor (q/k/v inside ``in_proj``), then ``inner``."""

    start: int
    stop: int
    inner: Transform = Transform()

    def __call__(self, x):
        return self.inner(x[self.start:self.stop])

    def inverse(self, y):  # one part only; exporters concatenate the parts in row order
        return self.inner.inverse(y)


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path            # our NNX state path
    name: str             # checkpoint tensor name
    hf_shape: tuple[int, ...]
    transform: Transform = Transform()

    @property
    def shape(self) -> tuple[int, ...]:
        """Our parameter's shape."""
        return self.transform.shape(self.hf_shape)

    @property
    def tower(self) -> str:
        return str(self.path[0])


def _llm(cfg: MiniCPMVConfig) -> Iterator[Entry]:
    c = cfg.llm
    d, n, k, h, f, v = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                        c.intermediate_size, c.vocab_size)
    yield Entry(("llm", "embed_tokens", "embedding"), "llm.model.embed_tokens.weight", (v, d))
    for i in range(c.num_hidden_layers):
        hf, us = f"llm.model.layers.{i}", ("llm", "layers", i)
        for proj, heads in (("q", n), ("k", k), ("v", k)):
            yield Entry(us + ("attn", proj, "kernel"), f"{hf}.self_attn.{proj}_proj.weight", (heads * h, d),
                        SplitHeadsIn(heads))
            yield Entry(us + ("attn", proj, "bias"), f"{hf}.self_attn.{proj}_proj.bias", (heads * h,),
                        SplitHeadsBias(heads))
        yield Entry(us + ("attn", "o", "kernel"), f"{hf}.self_attn.o_proj.weight", (d, n * h), MergeHeadsOut(n))
        yield Entry(us + ("mlp", "gate", "kernel"), f"{hf}.mlp.gate_proj.weight", (f, d), Transpose())
        yield Entry(us + ("mlp", "up", "kernel"), f"{hf}.mlp.up_proj.weight", (f, d), Transpose())
        yield Entry(us + ("mlp", "down", "kernel"), f"{hf}.mlp.down_proj.weight", (d, f), Transpose())
        yield Entry(us + ("input_norm", "weight"), f"{hf}.input_layernorm.weight", (d,))
        yield Entry(us + ("post_attn_norm", "weight"), f"{hf}.post_attention_layernorm.weight", (d,))
    yield Entry(("llm", "norm", "weight"), "llm.model.norm.weight", (d,))
    yield Entry(("llm", "lm_head", "kernel"), "llm.lm_head.weight", (v, d), Transpose())


def _layer_norm(us: Path, hf: str, dim: int, bias: str = "bias", weight: str = "weight") -> Iterator[Entry]:
    yield Entry(us + ("scale",), f"{hf}.{weight}", (dim,))
    yield Entry(us + ("bias",), f"{hf}.{bias}", (dim,))


def _vpm(cfg: MiniCPMVConfig) -> Iterator[Entry]:
    c = cfg.vision
    d, n, f = c.hidden_size, c.num_attention_heads, c.intermediate_size
    yield Entry(("vpm", "patch_embed", "kernel"), "vpm.embeddings.patch_embedding.weight",
                (d, c.num_channels, c.patch_size, c.patch_size), ConvToPatchKernel(c.num_channels, c.patch_size))
    yield Entry(("vpm", "patch_embed", "bias"), "vpm.embeddings.patch_embedding.bias", (d,))
    yield Entry(("vpm", "pos_embed"), "vpm.embeddings.position_embedding.weight", (c.num_positions, d))
    for j in range(cfg.num_vision_layers):
        hf, us = f"vpm.encoder.layers.{j}", ("vpm", "layers", j)
        for proj in ("q", "k", "v"):
            yield Entry(us + ("attn", proj, "kernel"), f"{hf}.self_attn.{proj}_proj.weight", (d, d),
                        SplitHeadsIn(n))
            yield Entry(us + ("attn", proj, "bias"), f"{hf}.self_attn.{proj}_proj.bias", (d,), SplitHeadsBias(n))
        yield Entry(us + ("attn", "o", "kernel"), f"{hf}.self_attn.out_proj.weight", (d, d), MergeHeadsOut(n))
        yield Entry(us + ("attn", "o", "bias"), f"{hf}.self_attn.out_proj.bias", (d,))
        yield from _layer_norm(us + ("ln1",), f"{hf}.layer_norm1", d)
        yield from _layer_norm(us + ("ln2",), f"{hf}.layer_norm2", d)
        yield Entry(us + ("mlp", "fc1", "kernel"), f"{hf}.mlp.fc1.weight", (f, d), Transpose())
        yield Entry(us + ("mlp", "fc1", "bias"), f"{hf}.mlp.fc1.bias", (f,))
        yield Entry(us + ("mlp", "fc2", "kernel"), f"{hf}.mlp.fc2.weight", (d, f), Transpose())
        yield Entry(us + ("mlp", "fc2", "bias"), f"{hf}.mlp.fc2.bias", (d,))
    yield from _layer_norm(("vpm", "post_ln"), "vpm.post_layernorm", d)


def _resampler(cfg: MiniCPMVConfig) -> Iterator[Entry]:
    r = cfg.resampler
    d, n = r.embed_dim, r.num_heads
    yield Entry(("resampler", "query"), "resampler.query", (r.num_queries, d))
    yield Entry(("resampler", "kv_proj", "kernel"), "resampler.kv_proj.weight", (d, r.kv_dim), Transpose())
    for i, proj in enumerate(("q", "k", "v")):
        rows = (i * d, (i + 1) * d)
        yield Entry(("resampler", proj, "kernel"), "resampler.attn.in_proj_weight", (3 * d, d),
                    Rows(*rows, SplitHeadsIn(n)))
        yield Entry(("resampler", proj, "bias"), "resampler.attn.in_proj_bias", (3 * d,),
                    Rows(*rows, SplitHeadsBias(n)))
    yield Entry(("resampler", "o", "kernel"), "resampler.attn.out_proj.weight", (d, d), MergeHeadsOut(n))
    yield Entry(("resampler", "o", "bias"), "resampler.attn.out_proj.bias", (d,))
    for ln in ("ln_q", "ln_kv", "ln_post"):
        yield from _layer_norm(("resampler", ln), f"resampler.{ln}", d)
    yield Entry(("resampler", "proj"), "resampler.proj", (d, d))


_TOWER_ENTRIES = {"llm": _llm, "vpm": _vpm, "resampler": _resampler}


def entries(cfg: MiniCPMVConfig, towers: tuple[str, ...] = TOWERS) -> list[Entry]:
    """All table entries for ``cfg`` (only the given towers), in a stable order."""
    unknown = set(towers) - set(_TOWER_ENTRIES)
    if unknown:
        raise ValueError(f"unknown towers {sorted(unknown)}; expected a subset of {TOWERS}")
    return [e for t in towers for e in _TOWER_ENTRIES[t](cfg)]


def expected_tensors(cfg: MiniCPMVConfig, towers: tuple[str, ...] = TOWERS) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name → shape, for every tensor the config implies."""
    return {e.name: e.hf_shape for e in entries(cfg, towers)}


_VISION_LAYER = re.compile(r"vpm\.encoder\.layers\.(\d+)\..+")


def extra_vision_layers(cfg: MiniCPMVConfig) -> Callable[[str], bool]:
    """Predicate for tensors of vision layers beyond those the config runs (reported, never used)."""

    def extra(name: str) -> bool:
        m = _VISION_LAYER.fullmatch(name)
        return bool(m) and int(m.group(1)) >= cfg.num_vision_layers

    return extra


def open_validated(folder: str | os.PathLike, cfg: MiniCPMVConfig) -> HFCheckpoint:
    """Opens the HF checkpoint ``folder`` and checks it against ``cfg``: every tensor the config implies,
    with its shape (:func:`expected_tensors`), and nothing else but :func:`extra_vision_layers` (a warning).
    Raises :class:`~minicpmv_jax.hf_checkpoint.CheckpointError` naming the tensor and file."""
    ckpt = HFCheckpoint.open(folder)
    ckpt.validate(expected_tensors(cfg), extra_ok=extra_vision_layers(cfg))
    return ckpt


def load_entries(module: nnx.Module, read: Callable[[str], np.ndarray], entries: list[Entry], *,
                 strip: int = 0, where: Callable[[str], str] = str,
                 shardings: Mapping[Path, Any] | None = None) -> nnx.Module:
    """Fills ``module`` (abstract from ``nnx.eval_shape``, or concrete) from checkpoint tensors.

    ``read(name)`` returns one tensor (read lazily, one at a time; a tensor shared by consecutive entries,
    e.g. ``in_proj``, is read once). ``strip`` drops leading path components, to fill one tower's module
    on its own (``strip=1`` with the ``vpm`` entries fills a bare ``VisionEncoder``). ``where(name)``
    names the tensor's location in errors. Every parameter of the towers named by ``entries`` must be
    filled by exactly one entry; shapes are checked after the transform. The kernel of a
    :class:`~minicpmv_jax.quantization.QuantizedEinsum` is quantized as it is read (filling its ``scale``
    too). Returns the filled module.
    """
    graphdef, state = nnx.split(module)
    flat = dict(nnx.to_flat_state(state))
    towers = {e.path[:1] for e in entries}
    todo = set(flat) if strip else {p for p in flat if p[:1] in towers}
    quantized = {tuple(p): m for p, m in nnx.iter_modules(module) if isinstance(m, QuantizedEinsum)}
    cached_name, cached = None, None

    def put(path: Path, arr: np.ndarray) -> None:
        sharding = shardings.get(path) if shardings else None
        if sharding is None:
            flat[path].set_value(jnp.asarray(arr))
        else:  # each device (of this process) takes its slice; works for multi-process meshes too
            flat[path].set_value(jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index]))
        todo.discard(path)

    for e in entries:
        path = e.path[strip:]
        if path not in todo:
            raise RuntimeError(f"table entry {e.name} -> {'/'.join(map(str, path))}: no such parameter "
                               "(or filled twice)")
        if e.name != cached_name:
            cached_name, cached = e.name, read(e.name)
        var = flat[path]
        value = e.transform(np.asarray(cached))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"{where(e.name)}: tensor {e.name} maps to shape {list(value.shape)}, "
                             f"the model expects {list(var.shape)}")
        layer = quantized.get(path[:-1]) if path[-1] == "kernel" else None
        if layer is not None:   # quantized here, one tensor at a time: the float kernel is dropped at once
            qvalue, scale = layer.set_from_float(value)
            put(path, np.asarray(qvalue))
            put(path[:-1] + ("scale",), np.asarray(scale))
        else:
            put(path, value.astype(var.dtype))
    if todo:
        first = sorted(todo, key=str)[0]
        raise RuntimeError(f"parameter {'/'.join(map(str, first))} was not filled by the name table")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
