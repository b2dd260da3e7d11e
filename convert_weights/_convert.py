"""``convert``: an HF safetensors folder → a converted folder (Orbax parameters plus config and tokenizer).

Streaming. Parameters are produced one at a time, in the name table's order, and written in groups of at
most ``group_bytes`` (default 512 MiB; a larger parameter is a group of its own) with Orbax's partial
saving: each group is one ``partial.save_async`` into the same checkpoint, finalized once at the end; the
next group is filled while one is written. Parameter arrays are carved from one :class:`Ring` of host
memory (the largest parameter plus half a group), allocated once: fresh memory per parameter is slow on
virtual machines that hand freed memory back to the host (:mod:`._ring`). A parameter is filled from its
source tensor in row blocks of about 32 MiB: rows kept as they are are read straight into it; the others
are viewed in the mapped source file and written through the transform's *inverse* view of the output
(``Transpose.inverse(out)`` is ``out.T``, so assigning source rows to it transposes block by block, never
holding the source tensor whole; :mod:`._transpose`). Peak memory is therefore the ring plus one block,
independent of the checkpoint's size.

Validation happens before anything is written (config, headers, sizes, names, shapes: errors name the file
and tensor); the output is atomic (:mod:`._output`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from minicpmv_jax import checkpoint_names as names
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.checkpoint_folder import copy_aux_files
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.dtypes import as_dtype
from minicpmv_jax.hf_checkpoint import HFCheckpoint

from ._errors import ConvertError
from ._output import check_destination, staged
from ._ring import Ring, Scratch, ring_bytes
from ._source import RowReader, describe_files, resolve_source
from ._transpose import assign_rows

GROUP_BYTES = 512 << 20
BLOCK_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class Job:
    """One parameter to write: its table entry, the source rows it reads and its stored dtype."""

    entry: names.Entry
    rows: tuple[int, int]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.entry.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    dst: str
    num_arrays: int          # parameters written
    num_parameters: int      # their elements
    bytes_read: int
    bytes_written: int       # parameter data, in the stored dtypes
    stored_dtypes: dict[str, int]
    ignored_tensors: tuple[str, ...]
    seconds: float
    fill_seconds: float = 0.0   # reading and transforming parameters (the main thread's own work)
    wait_seconds: float = 0.0   # the main thread waiting for saves (the write is the slower side)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None, overwrite: bool = False,
            progress: bool = True, group_bytes: int | None = None) -> ConversionResult:
    """Converts the HF checkpoint ``src`` (a folder, or a Hub id with ``huggingface_hub`` installed) to ``dst``.

    ``dtype`` (``"bfloat16"``, ``"float32"``, ``"float16"``) casts every parameter; ``None`` keeps the source
    dtypes. An existing ``dst`` is refused unless ``overwrite`` (and then only a folder this tool wrote is
    replaced). ``group_bytes`` bounds the parameter bytes written per partial save (default 512 MiB; a
    larger parameter is saved alone). Raises ``CheckpointError`` (or its subclass ``ConvertError``)
    naming the file and tensor for bad input, ``ConfigError`` for a bad ``config.json``; on any failure
    ``dst`` is left as it was.
    """
    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.path.normpath(os.path.expanduser(os.fspath(dst)))
    out_dtype = None if dtype is None else np.dtype(as_dtype(dtype))
    check_destination(dst, src, overwrite)          # before a Hub download
    folder = resolve_source(src)
    check_destination(dst, folder, overwrite)
    config = MiniCPMVConfig.from_pretrained(folder)
    ckpt = names.open_validated(folder, config)
    expected = names.expected_tensors(config)

    with RowReader(ckpt) as reader:
        jobs = plan(names.entries(config), reader, out_dtype)
        budget = group_bytes if group_bytes is not None else GROUP_BYTES
        result = ConversionResult(
            dst=dst, num_arrays=len(jobs),
            num_parameters=sum(int(np.prod(j.entry.shape, dtype=np.int64)) for j in jobs),
            bytes_read=sum((j.rows[1] - j.rows[0]) * reader.row_bytes(j.entry.name) for j in jobs),
            bytes_written=sum(j.nbytes for j in jobs),
            stored_dtypes=dict(collections.Counter(j.dtype.name for j in jobs)),
            ignored_tensors=tuple(sorted(set(ckpt.tensors) - set(expected))), seconds=0.0)
        bar = tqdm(total=result.bytes_read, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                   desc=f"convert {os.path.basename(dst)}", disable=not progress, file=sys.stderr)
        with staged(dst, overwrite) as tmp, bar:
            try:
                fill_s, wait_s = write_params(os.path.join(tmp, ock.PARAMS_DIR), jobs, reader, budget,
                                              bar.update)
                result = dataclasses.replace(result, fill_seconds=fill_s, wait_seconds=wait_s)
                copied = copy_aux_files(folder, tmp)
                _write_manifest(tmp, src, folder, ckpt, out_dtype, result, copied)
            except OSError as e:
                raise ConvertError(f"{dst}: writing the converted checkpoint failed ({e}); "
                                   f"{dst} was left as it was") from None
    return dataclasses.replace(result, seconds=time.perf_counter() - t0)


def plan(entries: list[names.Entry], reader: RowReader, out_dtype: np.dtype | None) -> list[Job]:
    """One job per table entry: the source rows it reads (a part of a packed tensor, or all)."""
    jobs = []
    for e in entries:
        rows = (e.transform.start, e.transform.stop) if isinstance(e.transform, names.Rows) else (0, e.hf_shape[0])
        jobs.append(Job(e, rows, out_dtype if out_dtype is not None else reader.dtype(e.name)))
    return jobs


def write_params(path: str, jobs: list[Job], reader: RowReader, budget: int,
                 progress: Callable[[int], Any] = lambda n: None) -> tuple[float, float]:
    """Writes every job's parameter into the Orbax checkpoint ``path``, one group per partial save.

    A group is the next parameters in order whose bytes add up to at most ``budget`` (a larger parameter
    stands alone). Arrays live in one :class:`Ring` of the largest parameter plus half a group: a save runs
    in the background while the next group is filled, and filling waits only where it reaches memory the
    running save still reads (a group is also cut short where it would wrap onto itself). Returns the
    seconds spent filling and waiting for saves.
    """
    ocp = ock.orbax_v1()
    ring = Ring(ring_bytes([j.nbytes for j in jobs], budget // 2))
    scratch = Scratch()
    group: dict = {}
    group_bytes = 0
    in_flight: _Save | None = None
    waited = [0.0]
    fill_s = 0.0

    def start_save() -> None:
        nonlocal group, group_bytes, in_flight
        if in_flight is not None:                # Orbax runs one partial save at a time
            in_flight, previous = None, in_flight
            previous.wait()
        in_flight = _Save(_write_group(path, ock.nest(group)), waited)
        ring.seal(in_flight.wait)
        group, group_bytes = {}, 0

    with ock.save_context():
        try:
            for job in jobs:
                if group and (group_bytes + job.nbytes > budget or not ring.fits(job.nbytes)):
                    start_save()
                out = ring.array(job.entry.shape, job.dtype)
                t = time.perf_counter()
                group[ock.tree_key(job.entry.path)] = fill(job, reader, progress, out=out, scratch=scratch)
                fill_s += time.perf_counter() - t
                group_bytes += job.nbytes
            if group:
                start_save()
            if in_flight is not None:
                in_flight, last = None, in_flight
                last.wait()
        finally:
            if in_flight is not None:            # failed while a save runs: let it end before the folder goes
                with contextlib.suppress(Exception):
                    in_flight.wait()
        ocp.partial.finalize(path)
    stored = ock.stored_arrays(path)
    for j in jobs:
        key = ock.tree_key(j.entry.path)
        if stored.get(key) != (tuple(j.entry.shape), j.dtype):
            raise ConvertError(f"{path}: parameter {ock.show(key)} reads back as {stored.get(key)}, "
                               f"written as {(tuple(j.entry.shape), j.dtype)}")
    if len(stored) != len(jobs):
        raise ConvertError(f"{path}: holds {len(stored)} arrays, {len(jobs)} were written")
    return fill_s, waited[0]


class _Save:
    """A running partial save; ``wait()`` (any number of times) returns once it is written, or raises.
    The seconds spent blocked are added to ``waited[0]``."""

    def __init__(self, response, waited: list[float]):
        self._response = response
        self._waited = waited
        self._done = False

    def wait(self) -> None:
        if not self._done:
            t = time.perf_counter()
            try:
                self._response.result()
            finally:
                self._waited[0] += time.perf_counter() - t
            self._done = True


def _write_group(path: str, tree: dict):
    """Starts one partial save of a group of parameters (the only place the converter writes array data);
    returns the response to wait on with ``.result()``."""
    return ock.orbax_v1().partial.save_async(path, tree)


def fill(job: Job, reader: RowReader, progress: Callable[[int], Any] = lambda n: None, *,
         out: np.ndarray | None = None, scratch: Scratch | None = None) -> np.ndarray:
    """The parameter of ``job`` in our layout and stored dtype, read from its source rows block by block.

    ``out`` (C-contiguous, the parameter's shape and dtype) receives it, else a new array. Rows that go
    to ``out`` unchanged are read into it; the others are viewed in the mapped file one block at a time
    and assigned through the inverse view (:func:`assign_rows`, with ``scratch`` for its packed tiles).
    """
    e, (start, stop) = job.entry, job.rows
    src_dtype = reader.dtype(e.name)
    out = np.empty(e.shape, job.dtype) if out is None else out
    scratch = Scratch() if scratch is None else scratch
    target = e.transform.inverse(out)            # the source rows [start, stop) as a view of `out`
    rows_shape = (stop - start,) + tuple(e.hf_shape[1:])
    if tuple(target.shape) != rows_shape or not np.may_share_memory(target, out):
        # A transform whose inverse is not a view: read the whole tensor and apply it forwards.
        whole = np.empty(e.hf_shape, src_dtype)
        _read_rows(reader, e.name, 0, whole, progress)
        out[...] = e.transform(whole)
        return out
    if target.flags.c_contiguous and target.dtype == src_dtype:
        _read_rows(reader, e.name, start, target, progress)   # straight into the output
        return out
    row_bytes = reader.row_bytes(e.name)
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    step -= step % 8 if step > 8 else 0          # whole packed words per block (see _transpose)
    for i in range(0, len(target), step):
        n = min(step, len(target) - i)
        assign_rows(target, i, reader.rows(e.name, start + i, start + i + n), scratch)   # transposes, casts
        reader.release(e.name, start + i, start + i + n)
        progress(n * row_bytes)
    return out


def _read_rows(reader: RowReader, name: str, start: int, out: np.ndarray, progress) -> None:
    step = max(1, BLOCK_BYTES // max(1, reader.row_bytes(name)))
    for i in range(0, len(out), step):
        block = out[i:i + step]
        reader.read_into(name, start + i, block)
        progress(block.nbytes)


def _write_manifest(folder: str, src: str, source_folder: str, ckpt: HFCheckpoint, out_dtype, result,
                    copied: list[str]) -> None:
    ock.write_manifest(
        folder,
        source={"location": src, "folder": os.path.abspath(source_folder), "files": describe_files(ckpt),
                "dtypes": dict(collections.Counter(i.dtype for i in ckpt.tensors.values()))},
        dtype={"requested": None if out_dtype is None else out_dtype.name, "stored": result.stored_dtypes},
        params={"folder": ock.PARAMS_DIR, "arrays": result.num_arrays, "parameters": result.num_parameters,
                "bytes": result.bytes_written},
        ignored_tensors=list(result.ignored_tensors),
        copied_files=copied,
        timing={"fill_s": round(result.fill_seconds, 3), "wait_for_writes_s": round(result.wait_seconds, 3)},
    )

