"""Reading an HF-layout checkpoint folder: ``model.safetensors`` or shards + ``model.safetensors.index.json``.

Opening a folder reads only the safetensors headers; tensors are read one at a time
(:meth:`HFCheckpoint.read`), so memory stays at about the largest tensor. :meth:`HFCheckpoint.validate`
checks the folder against the tensors a config implies (names and shapes from
:mod:`minicpmv_jax.checkpoint_names`) and raises :class:`CheckpointError` naming the tensor and file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Callable, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open

from .checkpoint_files import INDEX_FILE, SINGLE_FILE  # noqa: F401 (re-exported)

# ``owner/name`` as the Hugging Face Hub spells repository ids; ``./x``, ``/x``, ``~/x``, ``a/b/c`` are paths.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hugging Face Hub repository id (``openbmb/MiniCPM-V-2_6``)."""
    return bool(_HUB_ID.fullmatch(spec))


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt or does not match its config."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str           # absolute path of the safetensors file holding the tensor
    shape: tuple[int, ...]
    dtype: str          # safetensors dtype string, e.g. "BF16", "F32"


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _read_header(file: str) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file; a missing, truncated or corrupt file raises CheckpointError."""
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: no such file")
    try:
        with safe_open(file, framework="numpy") as f:
            infos = {}
            for name in f.keys():
                s = f.get_slice(name)
                infos[name] = TensorInfo(file, tuple(s.get_shape()), s.get_dtype())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    _check_size(file, infos)
    return infos


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


def _check_size(file: str, infos: Mapping[str, TensorInfo]) -> None:
    """A file shorter than its header promises is truncated."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    need = 8 + header_len + sum(int(np.prod(i.shape, dtype=np.int64)) * _DTYPE_BYTES.get(i.dtype, 1)
                                for i in infos.values())
    have = os.path.getsize(file)
    if have < need:
        raise CheckpointError(f"{file}: truncated ({have} bytes, the header describes {need})")


class HFCheckpoint:
    """The tensors of an HF checkpoint folder (headers read eagerly, data lazily)."""

    def __init__(self, folder: str, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "HFCheckpoint":
        folder = os.fspath(folder)
        index = os.path.join(folder, INDEX_FILE)
        single = os.path.join(folder, SINGLE_FILE)
        if os.path.isfile(index):
            return cls(folder, _read_sharded(folder, index))
        if os.path.isfile(single):
            return cls(folder, _read_header(single))
        raise CheckpointError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 via ml_dtypes)."""
        info = self.tensors[name]
        try:
            with safe_open(info.file, framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {name} ({e})") from None

    def where(self, name: str) -> str:
        """The file holding tensor ``name`` (for error messages)."""
        info = self.tensors.get(name)
        return info.file if info else self.folder

    def validate(self, expected: Mapping[str, tuple[int, ...]], *,
                 extra_ok: Callable[[str], bool] | None = None) -> None:
        """Every expected tensor present with its shape and a float dtype; nothing unexpected.

        ``extra_ok`` tells tensor names that may be present without being expected; they are
        reported with a warning (e.g. vision layers beyond the ones the config runs) and never used.
        """
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.folder}: tensor {name} is missing")
            if info.shape != tuple(shape):
                raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, "
                                      f"expected {list(shape)}")
            if info.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected a float type")
        extra = sorted(set(self.tensors) - set(expected))
        ignorable = [n for n in extra if extra_ok and extra_ok(n)]
        unexpected = [n for n in extra if n not in ignorable]
        if unexpected:
            info = self.tensors[unexpected[0]]
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(f"{info.file}: unexpected tensor {unexpected[0]}{more}")
        if ignorable:
            warnings.warn(f"{self.folder}: ignoring {len(ignorable)} tensors the config does not use, "
                          f"e.g. {ignorable[0]}", stacklevel=2)


def _read_sharded(folder: str, index: str) -> dict[str, TensorInfo]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(folder, shard)
        if not os.path.isfile(file):
            raise CheckpointError(f"{index}: points at {shard}, which does not exist")
        for name, info in _read_header(file).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{file}: holds tensor {name}, which {INDEX_FILE} "
                                      f"places in {weight_map.get(name)!r}")
            tensors[name] = info
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{os.path.join(folder, weight_map[missing[0]])}: tensor {missing[0]} listed "
                              f"in {INDEX_FILE} is not in the file")
    return tensors
