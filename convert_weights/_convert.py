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

Quantized (``quantize="int8"`` / ``"int4"``, ``--quantize``): each projection kernel of the language
model that the scheme covers (:mod:`minicpmv_jax.quantization`; the layout is read from the quantized
model built abstractly) is filled in its source dtype into one reusable buffer, quantized exactly as
``MiniCPMV.from_pretrained(SRC, quantize=...)`` quantizes it while loading (``quantize_kernel``, scales
in the output dtype), and written as ``kernel`` (int8, or int4 packed two per byte:
:func:`minicpmv_jax.orbax_checkpoint.stored_form`) and ``scale`` in the kernel's ring region. Peak memory
grows by that buffer and the quantization's float32 copy of one kernel; the float language model is never
held. The manifest records the scheme under ``"quantization"``.

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
from flax import nnx
from tqdm import tqdm

from minicpmv_jax import checkpoint_names as names
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.checkpoint_folder import copy_aux_files
from minicpmv_jax.config import MiniCPMVConfig
from minicpmv_jax.dtypes import as_dtype
from minicpmv_jax.hf_checkpoint import HFCheckpoint
from minicpmv_jax.model import abstract_model
from minicpmv_jax.quantization import QuantizationConfig, QuantizedEinsum, as_quantization, quantize_kernel

from ._errors import ConvertError
from ._output import check_destination, staged
from ._ring import Ring, Scratch, aligned, ring_bytes
from ._source import RowReader, describe_files, resolve_source
from ._transpose import assign_rows

GROUP_BYTES = 512 << 20
BLOCK_BYTES = 32 << 20


ArraySpec = tuple[ock.Key, tuple[int, ...], np.dtype]     # tree key, shape, dtype


@dataclasses.dataclass(frozen=True)
class Quantized:
    """How a job's kernel is written quantized: its einsum, the scheme, and its scale's shape and dtype."""

    equation: str
    config: QuantizationConfig
    scale_shape: tuple[int, ...]
    scale_dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Job:
    """One table entry to write: the entry, the source rows it reads, the dtype it is filled in (and
    stored in; a quantized kernel is filled in its source dtype and quantized from that), and for a
    quantized kernel its layout."""

    entry: names.Entry
    rows: tuple[int, int]
    dtype: np.dtype
    quantized: Quantized | None = None

    @property
    def arrays(self) -> list[ArraySpec]:
        """What it writes, as the model's parameter tree holds it: the parameter, or a quantized kernel's
        integer ``kernel`` and its ``scale``."""
        key = ock.tree_key(self.entry.path)
        if self.quantized is None:
            return [(key, tuple(self.entry.shape), self.dtype)]
        q = self.quantized
        return [(key, tuple(self.entry.shape), np.dtype(q.config.qtype)),
                (key[:-1] + ("scale",), q.scale_shape, q.scale_dtype)]

    @property
    def stored(self) -> list[ArraySpec]:
        """:attr:`arrays` as stored (int4 packed: :func:`minicpmv_jax.orbax_checkpoint.stored_form`)."""
        return [(key, *ock.stored_form(shape, dtype)) for key, shape, dtype in self.arrays]

    @property
    def nbytes(self) -> int:
        """Bytes written."""
        return sum(_nbytes(shape, dtype) for _, shape, dtype in self.stored)

    @property
    def region_bytes(self) -> int:
        """Bytes of its region of the ring: the stored arrays one after another, each cache-line aligned."""
        sizes = [_nbytes(shape, dtype) for _, shape, dtype in self.stored]
        return sum(aligned(n) for n in sizes[:-1]) + sizes[-1]


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    dst: str
    num_arrays: int          # parameters written
    num_parameters: int      # their elements
    bytes_read: int
    bytes_written: int       # parameter data, in the stored dtypes
    stored_dtypes: dict[str, int]    # arrays per dtype (int4 counted as int4, though stored packed)
    ignored_tensors: tuple[str, ...]
    seconds: float
    fill_seconds: float = 0.0   # reading, transforming (and quantizing) parameters: the main thread's work
    wait_seconds: float = 0.0   # the main thread waiting for saves (the write is the slower side)
    quantization: QuantizationConfig | None = None


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: Any = None, overwrite: bool = False,
            progress: bool = True, group_bytes: int | None = None,
            quantize: str | QuantizationConfig | None = None) -> ConversionResult:
    """Converts the HF checkpoint ``src`` (a folder, or a Hub id with ``huggingface_hub`` installed) to ``dst``.

    ``dtype`` (``"bfloat16"``, ``"float32"``, ``"float16"``) casts every parameter; ``None`` keeps the source
    dtypes. ``quantize`` (``"int8"``, ``"int4"`` or a :class:`~minicpmv_jax.quantization.QuantizationConfig`)
    writes the language model's projections quantized, as ``MiniCPMV.from_pretrained(src, dtype=dtype,
    quantize=quantize)`` holds them (scales in ``dtype``, else in each kernel's source dtype); the folder
    then loads quantized without being asked. An existing ``dst`` is refused unless ``overwrite`` (and
    then only a folder this tool wrote is replaced). ``group_bytes`` bounds the parameter bytes written per
    partial save (default 512 MiB; a larger parameter is saved alone). Raises ``CheckpointError`` (or its
    subclass ``ConvertError``) naming the file and tensor for bad input, ``ConfigError`` for a bad
    ``config.json``, ``ValueError`` naming ``dtype`` or ``quantize``; on any failure ``dst`` is left
    as it was.
    """
    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.path.normpath(os.path.expanduser(os.fspath(dst)))
    out_dtype = None if dtype is None else np.dtype(as_dtype(dtype))
    quantization = as_quantization(quantize)
    check_destination(dst, src, overwrite)          # before a Hub download
    folder = resolve_source(src)
    check_destination(dst, folder, overwrite)
    config = MiniCPMVConfig.from_pretrained(folder)
    ckpt = names.open_validated(folder, config)
    expected = names.expected_tensors(config)

    with RowReader(ckpt) as reader:
        jobs = plan(names.entries(config), reader, out_dtype, quantized_layouts(config, quantization))
        budget = group_bytes if group_bytes is not None else GROUP_BYTES
        arrays = [a for j in jobs for a in j.arrays]
        result = ConversionResult(
            dst=dst, num_arrays=len(arrays),
            num_parameters=sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in arrays),
            bytes_read=sum((j.rows[1] - j.rows[0]) * reader.row_bytes(j.entry.name) for j in jobs),
            bytes_written=sum(j.nbytes for j in jobs),
            stored_dtypes=dict(collections.Counter(np.dtype(dtype).name for _, _, dtype in arrays)),
            ignored_tensors=tuple(sorted(set(ckpt.tensors) - set(expected))), seconds=0.0,
            quantization=quantization)
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


def quantized_layouts(config: MiniCPMVConfig, quantization: QuantizationConfig | None
                      ) -> dict[names.Path, tuple[str, QuantizationConfig, tuple[int, ...]]]:
    """Kernel path → (equation, scheme, scale shape) of every kernel ``quantization`` covers, read from the
    quantized model built abstractly (so the folder holds exactly its parameter tree); {} for None."""
    if quantization is None:
        return {}
    model = abstract_model(config, "float32", quantize=quantization)
    return {tuple(path) + ("kernel",): (m.equation, m.quantization, tuple(m.scale.get_value().shape))
            for path, m in nnx.iter_modules(model) if isinstance(m, QuantizedEinsum)}


def plan(entries: list[names.Entry], reader: RowReader, out_dtype: np.dtype | None,
         quantized: dict[names.Path, tuple[str, QuantizationConfig, tuple[int, ...]]] | None = None) -> list[Job]:
    """One job per table entry: the source rows it reads (a part of a packed tensor, or all); a kernel
    named in ``quantized`` (:func:`quantized_layouts`) is filled in its source dtype and written quantized,
    its scale in ``out_dtype`` (else the source dtype)."""
    quantized = dict(quantized or {})
    jobs = []
    for e in entries:
        rows = (e.transform.start, e.transform.stop) if isinstance(e.transform, names.Rows) else (0, e.hf_shape[0])
        dtype = out_dtype if out_dtype is not None else reader.dtype(e.name)
        layout = quantized.pop(tuple(e.path), None)
        if layout is None:
            jobs.append(Job(e, rows, dtype))
        else:
            equation, config, scale_shape = layout
            jobs.append(Job(e, rows, reader.dtype(e.name), Quantized(equation, config, scale_shape, dtype)))
    if quantized:
        raise RuntimeError(f"quantized kernels without a table entry: {sorted(map(str, quantized))[:3]}")
    return jobs


def write_params(path: str, jobs: list[Job], reader: RowReader, budget: int,
                 progress: Callable[[int], Any] = lambda n: None) -> tuple[float, float]:
    """Writes every job's parameter into the Orbax checkpoint ``path``, one group per partial save.

    A group is the next parameters in order whose bytes add up to at most ``budget`` (a larger parameter
    stands alone). Arrays live in one :class:`Ring` of the largest parameter plus half a group: a save runs
    in the background while the next group is filled, and filling waits only where it reaches memory the
    running save still reads (a group is also cut short where it would wrap onto itself). A quantized
    kernel's float values pass through one reusable buffer outside the ring (:func:`fill_job`). Returns
    the seconds spent filling and waiting for saves.
    """
    ocp = ock.orbax_v1()
    ring = Ring(ring_bytes([j.region_bytes for j in jobs], budget // 2))
    scratch, floats = Scratch(), Scratch()
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
                if group and (group_bytes + job.nbytes > budget or not ring.fits(job.region_bytes)):
                    start_save()
                region = ring.array((job.region_bytes,), np.uint8)
                t = time.perf_counter()
                group.update(fill_job(job, reader, region, progress, scratch=scratch, floats=floats))
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
    written = [a for j in jobs for a in j.stored]
    for key, shape, dtype in written:
        if stored.get(key) != (shape, dtype):
            raise ConvertError(f"{path}: parameter {ock.show(key)} reads back as {stored.get(key)}, "
                               f"written as {(shape, dtype)}")
    if len(stored) != len(written):
        raise ConvertError(f"{path}: holds {len(stored)} arrays, {len(written)} were written")
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


def fill_job(job: Job, reader: RowReader, region: np.ndarray, progress: Callable[[int], Any] = lambda n: None,
             *, scratch: Scratch | None = None, floats: Scratch | None = None) -> dict[ock.Key, np.ndarray]:
    """The arrays ``job`` writes (:attr:`Job.stored`), carved from ``region`` (``job.region_bytes`` bytes):
    the parameter filled by :func:`fill`, or a quantized kernel filled into ``floats`` (a reusable
    buffer) in its source dtype, quantized by :func:`~minicpmv_jax.quantization.quantize_kernel` as the
    loader does, and stored as its integer kernel (int4 packed) and scale."""
    out, offset = {}, 0
    for key, shape, dtype in job.stored:
        n = _nbytes(shape, dtype)
        out[key] = region[offset:offset + n].view(dtype).reshape(shape)
        offset += aligned(n)
    if job.quantized is None:
        (array,) = out.values()
        fill(job, reader, progress, out=array, scratch=scratch)
        return out
    q = job.quantized
    kernel = (floats or Scratch()).array(job.entry.shape, job.dtype)
    fill(job, reader, progress, out=kernel, scratch=scratch)
    qvalue, scale = quantize_kernel(kernel, q.equation, q.config, scale_dtype=q.scale_dtype)
    kernel_out, scale_out = out.values()
    kernel_out[...] = np.asarray(ock.pack_int4(qvalue) if q.config.mode == "int4" else qvalue)
    scale_out[...] = np.asarray(scale)
    return out


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
        quantization=None if result.quantization is None else result.quantization.to_json(),
        params={"folder": ock.PARAMS_DIR, "arrays": result.num_arrays, "parameters": result.num_parameters,
                "bytes": result.bytes_written,
                **({"int4_storage": ock.INT4_STORAGE} if "int4" in result.stored_dtypes else {})},
        ignored_tensors=list(result.ignored_tensors),
        copied_files=copied,
        timing={"fill_s": round(result.fill_seconds, 3), "wait_for_writes_s": round(result.wait_seconds, 3)},
    )

