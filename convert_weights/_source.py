"""The conversion's source: an HF folder (or a Hugging Face Hub id) and its tensors, read in row blocks.

:class:`RowReader` gives any row range of a safetensors tensor, either copied into an array with
positioned reads (``read_into``) or as a read-only view of the file mapped into memory (``rows``, then
``release`` once used, which drops those pages from the process again): the converter never holds more of
a source tensor than one block. The view saves the copy where the rows are transformed anyway (the
transposes read them straight from the page cache). The files' headers and sizes were already validated
by :class:`minicpmv_jax.hf_checkpoint.HFCheckpoint`; each view checks the file still holds its rows (a
file truncated while it is mapped would end the process with SIGBUS).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os

import ml_dtypes
import numpy as np

from minicpmv_jax.hf_checkpoint import CheckpointError, HFCheckpoint
from minicpmv_jax.hub import resolve_model

from ._errors import ConvertError

SAFETENSORS_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                      "BF16": np.dtype(ml_dtypes.bfloat16)}


# --------------------------------------------------------------------------- where the source is


def resolve_source(src: str | os.PathLike) -> str:
    """``src`` as a local HF folder: an existing folder (``~`` expanded), ``demo`` (the tiny random-weight
    demo checkpoint in the HF layout, built once: something small to try conversion on), or a Hub id
    downloaded with ``huggingface_hub`` (never a folder converted before: conversion reads safetensors)."""
    src = os.fspath(src)
    try:
        return resolve_model(src, converted=False)
    except CheckpointError as e:  # the converter's own error type, same message
        raise ConvertError(str(e)) from None


def describe_files(ckpt: HFCheckpoint) -> list[dict]:
    """Each safetensors file: name, size and the SHA-256 of its header (names, dtypes, shapes, offsets)."""
    out = []
    for file in sorted({info.file for info in ckpt.tensors.values()}):
        with open(file, "rb") as f:
            header = f.read(int.from_bytes(f.read(8), "little"))
        out.append({"name": os.path.relpath(file, ckpt.folder), "bytes": os.path.getsize(file),
                    "header_sha256": hashlib.sha256(header).hexdigest()})
    return out


# --------------------------------------------------------------------------- reading row blocks


class RowReader:
    """Row ranges of the tensors of an opened :class:`HFCheckpoint`, read with ``os.preadv``."""

    def __init__(self, ckpt: HFCheckpoint):
        self.ckpt = ckpt
        self._offsets: dict[str, dict[str, tuple[int, int]]] = {}
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:     # a view is still referenced (an exception's traceback): unmapped when freed
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dtype(self, name: str) -> np.dtype:
        return SAFETENSORS_DTYPES[self.ckpt.tensors[name].dtype]

    def row_bytes(self, name: str) -> int:
        shape = self.ckpt.tensors[name].shape
        return int(np.prod(shape[1:], dtype=np.int64)) * self.dtype(name).itemsize

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of tensor ``name`` as a read-only view of the mapped file."""
        info = self.ckpt.tensors[name]
        lo, hi = self._byte_range(name, start, stop)
        m = self._map(info.file)
        have = os.fstat(self._fd(info.file)).st_size
        if hi > have:
            raise CheckpointError(f"{info.file}: truncated inside tensor {name} (the file ends at byte {have}, "
                                  f"the tensor needs {hi})")
        flat = np.frombuffer(m, np.uint8, count=hi - lo, offset=lo)
        return flat.view(self.dtype(name)).reshape((stop - start,) + tuple(info.shape[1:]))

    def release(self, name: str, start: int, stop: int) -> None:
        """Drops the pages of rows ``[start, stop)`` from the process (they stay in the page cache)."""
        lo, hi = self._byte_range(name, start, stop)
        page = mmap.PAGESIZE
        lo, hi = lo // page * page, -(-hi // page) * page
        m = self._maps[self.ckpt.tensors[name].file]
        if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):     # POSIX; elsewhere the OS decides
            m.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(m)) - lo)

    def _byte_range(self, name: str, start: int, stop: int) -> tuple[int, int]:
        info = self.ckpt.tensors[name]
        begin, end = self._data_range(info.file, name)
        lo, hi = begin + start * self.row_bytes(name), begin + stop * self.row_bytes(name)
        if not 0 <= start <= stop or hi > end:
            raise CheckpointError(f"{info.file}: tensor {name}: rows {start}..{stop} lie outside its data")
        return lo, hi

    def _map(self, file: str) -> mmap.mmap:
        if file not in self._maps:
            try:
                self._maps[file] = mmap.mmap(self._fd(file), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file}: cannot map it into memory ({e})") from None
        return self._maps[file]

    def read_into(self, name: str, start: int, out: np.ndarray) -> None:
        """Fills the C-contiguous ``out`` (``len(out)`` rows, the tensor's dtype) from row ``start`` on."""
        if not out.flags.c_contiguous:
            raise ValueError("read_into needs a C-contiguous array")
        info = self.ckpt.tensors[name]
        offset, _ = self._byte_range(name, start, start + len(out))
        fd = self._fd(info.file)
        size = out.nbytes
        buf = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < size:
            try:
                n = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{info.file}: cannot read tensor {name} ({e})") from None
            if n == 0:
                raise CheckpointError(f"{info.file}: truncated inside tensor {name} (the file ends at byte "
                                      f"{offset + done}, the tensor needs {offset + size})")
            done += n

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def _data_range(self, file: str, name: str) -> tuple[int, int]:
        """Absolute byte range of ``name``'s data in ``file`` (from the safetensors header)."""
        if file not in self._offsets:
            try:
                with open(file, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                self._offsets[file] = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                                       for k, v in header.items() if k != "__metadata__"}
            except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors header ({e})") from None
        try:
            return self._offsets[file][name]
        except KeyError:
            raise CheckpointError(f"{file}: holds no tensor {name}") from None
