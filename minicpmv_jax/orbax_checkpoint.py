"""The folder ``minicpmv-jax convert`` writes, and restoring it into a model.

Layout of a converted folder::

    DST/
      convert_manifest.json   format name and version, tool versions, source files (sizes, header hashes),
                              stored dtypes, quantization, tensors read and ignored (:data:`MANIFEST_FILE`)
      config.json, generation_config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json,
      vocab.json, merges.txt, ...   copied unchanged from the HF folder
      params/                 an Orbax checkpoint (OCDBT, uncompressed) of the parameter tree (:data:`PARAMS_DIR`)

The parameter tree holds exactly the parameters of :class:`minicpmv_jax.model.MiniCPMVModel`, already in our
layout (transposed, split into heads: the name table's transforms applied), as nested dicts keyed by the
NNX path components spelled as strings: ``params["llm"]["layers"]["0"]["attn"]["q"]["kernel"]``. Loading
is therefore a plain Orbax restore into a tree of ``jax.ShapeDtypeStruct`` that carry each parameter's
target sharding and dtype: each device receives only its own shards, and nothing is transformed on the
host. Each array is stored as one chunk (Orbax's layout for host arrays); chunking aligned with a mesh, so
that a host also *reads* only its shards' bytes, belongs with sharded loading.

A folder written with ``minicpmv-jax convert --quantize`` holds the quantized language model's parameters
(:mod:`minicpmv_jax.quantization`: each projection's integer ``kernel`` beside its float ``scale``) and
records the scheme in the manifest's ``"quantization"`` (:func:`stored_quantization`). Orbax (tensorstore)
writes an ``int4`` array one byte per element, so an int4 array is stored **packed**, two values per byte
(:func:`stored_form`, :func:`pack_int4`): ``int8 [..., ceil(n / 2)]`` for ``int4 [..., n]``, byte ``j``
of a row holding element ``2j`` in its low nibble and ``2j + 1`` in its high nibble (an odd last axis is
padded with a zero). :func:`restore_params` reads the packed bytes into the target's sharding (the last
axis whole where its pieces would hold an odd number of values) and unpacks them on the devices;
:func:`write_params` packs int4 leaves alike.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint_files import MANIFEST_FILE, PARAMS_DIR, is_converted  # noqa: F401 (re-exported)
from .checkpoint_names import Path
from .hf_checkpoint import CheckpointError
from .quantization import QuantizationConfig
from .version import __version__

FORMAT = "minicpmv-jax/orbax"
FORMAT_VERSION = 1

Key = tuple[str, ...]


def orbax_v1():
    """``orbax.checkpoint.experimental.v1`` (partial saving, loading into abstract trees), or a clear error."""
    try:
        import orbax.checkpoint.experimental.v1 as ocp
        ocp.partial.save  # noqa: B018 (present from orbax-checkpoint 0.12 on)
    except (ImportError, AttributeError) as e:
        raise CheckpointError("converted checkpoints need orbax-checkpoint >= 0.12.8 with "
                              f"orbax.checkpoint.experimental.v1.partial ({e})") from None
    return ocp


# --------------------------------------------------------------------------- writing


def save_context():
    """The Orbax context of every parameter save, the converter's and :func:`write_params`' alike: arrays
    saved as they are (no defensive copy: a saved host array is never touched again), uncompressed (zstd
    saves ~25 % on bf16 but costs CPU on every save and load)."""
    ctx = orbax_v1().Context()
    ctx.memory.deepcopy_host_arrays = False
    ctx.array.saving.use_compression = False
    return ctx


def write_params(path: str | os.PathLike, tree: Mapping[str, Any]) -> str:
    """Saves a parameter tree (nested dicts of arrays, :func:`nest`'s layout) as the Orbax checkpoint ``path``
    in one save, with :func:`save_context`'s settings; returns the absolute path written.

    ``path`` is the checkpoint folder itself (a converted folder's ``params/``, :data:`PARAMS_DIR`), a new
    one. Relative paths are made absolute (Orbax refuses them). Sharded ``jax.Array`` leaves are
    written by every process for its own shards; call it on every process of a multi-host run. The
    arrays must not change until it returns. ``int4`` leaves are stored packed (:func:`pack_int4`).
    """
    path = os.path.abspath(os.fspath(path))
    ocp = orbax_v1()
    tree = nest({key: pack_int4(value) if _is_int4(value.dtype) else value for key, value in flatten(tree)})
    with save_context():
        ocp.save_pytree(path, tree)
    return path


def write_manifest(folder: str | os.PathLike, **fields: Any) -> None:
    """Writes ``folder``'s :data:`MANIFEST_FILE`: the format, format version, tool versions and creation time
    every converted folder records, then ``fields`` (JSON-able; e.g. ``source``, ``dtype``, ``params``,
    ``copied_files``) — the converter's and fine-tuning's export alike."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": _versions("minicpmv-jax", "orbax-checkpoint", "jax", "numpy"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
    with open(os.path.join(folder, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.write("\n")


def _versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (those installed); ``minicpmv-jax`` is this package's own."""
    out = {}
    for p in packages:
        if p == "minicpmv-jax":
            out[p] = __version__
            continue
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- int4 storage


#: How int4 arrays are stored, in words (a converted folder's manifest repeats it under ``params``).
INT4_STORAGE = ("int4 [..., n] stored as int8 [..., ceil(n/2)]: byte j holds element 2j in its low nibble and "
                "2j+1 in its high nibble (two's complement; an odd n padded with 0)")


def _is_int4(dtype: Any) -> bool:
    return np.dtype(dtype) == np.dtype(jnp.int4)


def stored_form(shape: tuple[int, ...], dtype: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) an array of ``shape`` and ``dtype`` is stored with: as it is, except ``int4 [..., n]``,
    stored packed as ``int8 [..., ceil(n / 2)]`` (:func:`pack_int4`; Orbax would spend a byte per value)."""
    shape = tuple(int(n) for n in shape)
    if not _is_int4(dtype):
        return shape, np.dtype(dtype)
    if not shape:
        raise ValueError("an int4 scalar cannot be stored packed")
    return shape[:-1] + (-(-shape[-1] // 2),), np.dtype(np.int8)


@jax.jit
def pack_int4(x: jax.Array) -> jax.Array:
    """``int4 [..., n]`` → ``int8 [..., ceil(n / 2)]``: byte ``j`` holds element ``2j`` in its low nibble
    and ``2j + 1`` in its high nibble (two's complement; a zero pads an odd ``n``). Exact: see
    :func:`unpack_int4`."""
    v = jnp.asarray(x).astype(jnp.int8)
    if v.shape[-1] % 2:
        v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, 1)])
    pairs = v.reshape(v.shape[:-1] + (v.shape[-1] // 2, 2))
    return (pairs[..., 0] & 0x0F) | jnp.left_shift(pairs[..., 1], 4)


@functools.partial(jax.jit, static_argnames="length")
def unpack_int4(packed: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`pack_int4`: ``int8 [..., ceil(length / 2)]`` → ``int4 [..., length]``."""
    low = jnp.right_shift(jnp.left_shift(packed, 4), 4)      # arithmetic shifts: sign-extends the nibble
    high = jnp.right_shift(packed, 4)
    values = jnp.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
    return values[..., :length].astype(jnp.int4)


@functools.lru_cache(maxsize=64)
def _unpacker(length: int, sharding: jax.sharding.Sharding):
    """:func:`unpack_int4` compiled to leave its result in ``sharding`` (one program per shape and place)."""
    return jax.jit(functools.partial(unpack_int4, length=length), out_shardings=sharding)


def _packed_sharding(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """Where the packed bytes of an int4 array of ``shape`` placed as ``sharding`` are read to: the same
    place, except that the halved last axis stays whole where ``sharding`` splits it into an odd number
    of values per piece (the unpacking program then moves them)."""
    if not isinstance(sharding, jax.sharding.NamedSharding) or not shape:
        return sharding
    pieces = shape[-1] // sharding.shard_shape(shape)[-1]
    if pieces == 1 or (shape[-1] // pieces) % 2 == 0:
        return sharding
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:-1], None))


# --------------------------------------------------------------------------- tree keys


def tree_key(path: Path) -> Key:
    """Our NNX path → the key path of the stored tree (every component a string)."""
    return tuple(str(p) for p in path)


def nest(flat: Mapping[Key, Any]) -> dict:
    """``{("llm", "norm", "weight"): x}`` → ``{"llm": {"norm": {"weight": x}}}``."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: Key = ()) -> Iterator[tuple[Key, Any]]:
    """Inverse of :func:`nest`: (key path, leaf) pairs."""
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, prefix + (str(name),))
        else:
            yield prefix + (str(name),), value


def show(key: Key) -> str:
    return "/".join(key)


# --------------------------------------------------------------------------- manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a converted folder, checked for our format and a version we can read."""
    file = os.path.join(folder, MANIFEST_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such file (not a folder written by minicpmv-jax convert)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a minicpmv-jax manifest (format is not {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {manifest.get('format_version')!r}, this build reads "
                              f"version {FORMAT_VERSION}; convert the HF folder again")
    return manifest


def stored_quantization(folder: str | os.PathLike, requested: QuantizationConfig | None = None
                        ) -> QuantizationConfig | None:
    """The quantization a converted folder's parameters were written with (its manifest's
    ``quantization``; None: float), checked against ``requested`` (None accepts what is stored).

    A folder is loaded as it was written: asking for another scheme than the stored one (or for one on a
    float folder) is a ``CheckpointError`` naming both, since re-quantizing stored integers would compound
    the rounding; convert the HF folder again instead."""
    file = os.path.join(folder, MANIFEST_FILE)
    record = read_manifest(folder).get("quantization")
    try:
        stored = None if record is None else QuantizationConfig.from_json(record, where=f"{file}: quantization")
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    if requested is not None and requested != stored:
        raise CheckpointError(f"{file}: the parameters were written "
                              + ("unquantized" if stored is None else f"quantized as {stored}")
                              + f"; asked to load them as {requested}. Leave quantize out to load them as "
                              "they are, or convert the HF folder again with that --quantize")
    return stored


# --------------------------------------------------------------------------- restore


def stored_params(folder: str | os.PathLike) -> dict[Key, tuple[tuple[int, ...], np.dtype]]:
    """Key path → (shape, dtype) of every array in the converted folder's parameter checkpoint."""
    params = os.path.join(folder, PARAMS_DIR)
    if not os.path.isdir(params):
        raise CheckpointError(f"{params}: no such folder (the converted checkpoint is incomplete)")
    return stored_arrays(params)


def stored_arrays(params: str | os.PathLike) -> dict[Key, tuple[tuple[int, ...], np.dtype]]:
    """Key path → (shape, dtype) of every array in the Orbax checkpoint ``params`` (metadata only)."""
    ocp = orbax_v1()
    params = os.path.abspath(params)  # Orbax refuses relative paths
    try:
        tree = ocp.metadata(params).metadata
    except Exception as e:  # orbax raises assorted types for a damaged checkpoint
        raise CheckpointError(f"{params}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from None
    return {key: (tuple(m.shape), np.dtype(m.dtype)) for key, m in flatten(tree)}


def restore_params(folder: str | os.PathLike, module: nnx.Module, *,
                   shardings: Mapping[Path, jax.sharding.Sharding] | None = None) -> nnx.Module:
    """Fills ``module`` (abstract, from ``nnx.eval_shape``) from a converted folder's parameters.

    Every parameter is restored straight into its target: the module's dtype (cast by the reader when it
    differs from the stored one; bit-identical to numpy's cast except for NaN payloads) and
    ``shardings[path]`` (default: the first device); an int4 parameter's packed bytes are read there and
    unpacked on its devices (:func:`stored_form`). The stored tree must hold exactly the module's
    parameters with the same shapes; otherwise a ``CheckpointError`` names the parameter (e.g. after
    ``config.json`` was edited).
    """
    folder = os.path.abspath(folder)  # Orbax refuses relative paths
    graphdef, state = nnx.split(module)
    flat = dict(nnx.to_flat_state(state))
    wanted = {tree_key(p): p for p in flat}
    _check_against(folder, {key: (tuple(flat[path].shape), flat[path].dtype) for key, path in wanted.items()})
    params = os.path.join(folder, PARAMS_DIR)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = shardings or {}
    targets = {key: (tuple(flat[path].shape), flat[path].dtype, shardings.get(path, default))
               for key, path in wanted.items()}
    abstract = nest({key: _stored_struct(*target) for key, target in targets.items()})
    ocp = orbax_v1()
    try:
        restored = dict(flatten(ocp.load(params, abstract)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{params}: cannot restore the parameters ({type(e).__name__}: {e})") from None
    for key, path in wanted.items():
        shape, dtype, where = targets[key]
        value = restored.pop(key)
        if _is_int4(dtype):
            value = _unpacker(shape[-1], where)(value)
        flat[path].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _stored_struct(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    """What Orbax restores a parameter of ``shape`` / ``dtype`` placed as ``sharding`` into: itself, or for
    int4 its packed bytes (:func:`stored_form`)."""
    if not _is_int4(dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    packed_shape, packed_dtype = stored_form(shape, dtype)
    return jax.ShapeDtypeStruct(packed_shape, packed_dtype, sharding=_packed_sharding(sharding, shape))


def check_params(folder: str | os.PathLike, module: nnx.Module) -> dict[Key, tuple[tuple[int, ...], np.dtype]]:
    """Checks a converted folder against ``module``'s parameters (abstract is fine) without loading them.

    Returns the stored (shape, dtype) per parameter; raises ``CheckpointError`` naming the first missing,
    unexpected or misshapen parameter.
    """
    flat = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    return _check_against(os.fspath(folder), {tree_key(p): (tuple(v.shape), v.dtype) for p, v in flat.items()})


def _check_against(folder: str, wanted: Mapping[Key, tuple[tuple[int, ...], Any]]) -> dict:
    """``wanted``: (shape, dtype) per key; an int4 parameter is expected in its packed :func:`stored_form`."""
    read_manifest(folder)
    params = os.path.join(folder, PARAMS_DIR)
    stored = stored_params(folder)
    config = os.path.join(folder, "config.json")
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise CheckpointError(f"{params}: parameter {show(missing[0])} is missing"
                              f"{_more(missing)}; it does not match {config}")
    unexpected = sorted(set(stored) - set(wanted))
    if unexpected:
        raise CheckpointError(f"{params}: unexpected parameter {show(unexpected[0])}{_more(unexpected)}; "
                              f"it does not match {config}")
    for key, (shape, dtype) in wanted.items():
        want = stored_form(shape, dtype)[0]
        if stored[key][0] != want:
            packed = f" (int4 {list(shape)}, stored two per byte)" if _is_int4(dtype) else ""
            raise CheckpointError(f"{params}: parameter {show(key)} has shape {list(stored[key][0])}, "
                                  f"{config} implies {list(want)}{packed}")
    return stored


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
