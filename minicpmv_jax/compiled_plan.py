"""What XLA says the generation programs need: compile the prefill and one decode step, weights abstract.

:mod:`minicpmv_jax.memory_plan` counts parameters and the KV cache by hand; this module asks the compiler.
``compiled_memory(model, prompt_len=T, ...)`` builds the model with ``nnx.eval_shape`` (nothing is
materialised), lowers and compiles the programs that ``generate`` runs — the prefill of a text prompt of T
tokens (bucketed as generation buckets it) into a cache of T + N slots, and one decode step against that
cache — on the current backend (and mesh, if given), and reads XLA's memory analysis of each: per device,
the bytes of the arguments (parameters, cache, inputs), the outputs, and the temporaries the program
needs while it runs (where attention's logits live: ``[B, N, T, S]`` float32 for the dense kernel,
one block for the blockwise one).

The numbers are the compiler's, for this backend: a CPU compile says what CPU needs. The ``plan`` command
prints them with ``--compile`` (and as JSON with ``--json``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from minicpmv_jax import generate, sharding
from minicpmv_jax.buckets import MIN_LENGTH, bucket
from minicpmv_jax.dtypes import as_dtype
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generation_config import GenerationConfig
from minicpmv_jax.memory_plan import resolve_config
from minicpmv_jax.model import abstract_model

__all__ = ["ProgramMemory", "CompiledMemory", "compiled_memory", "format_compiled"]


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's memory analysis of one compiled program, bytes per device."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    compile_s: float

    @classmethod
    def of(cls, compiled, compile_s: float) -> "ProgramMemory":
        m = compiled.memory_analysis()
        return cls(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                   temp_bytes=int(m.temp_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
                   code_bytes=int(m.generated_code_size_in_bytes), compile_s=compile_s)


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """The prefill and one decode step of ``batch`` rows, prompt ``prompt_len`` bucketed to ``prompt_slots``,
    ``cache_slots`` = prompt slots + the new-token buffer, compiled for ``backend`` (``devices`` devices)."""

    prompt_len: int
    prompt_slots: int
    cache_slots: int
    batch: int
    dtype: str
    attention: str
    backend: str
    devices: int
    prefill: ProgramMemory
    decode: ProgramMemory

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compiled_memory(model: Any, *, prompt_len: int, batch: int = 1, max_new_tokens: int = 16,
                    dtype: Any = "bfloat16", attention: str = "auto", mesh: Mesh | None = None,
                    rules: sharding.Rules = sharding.RULES,
                    prefill_chunk: int | None = generate.PREFILL_CHUNK) -> CompiledMemory:
    """Compiles generation's prefill at ``prompt_len`` and one decode step; returns XLA's memory analysis.

    Args:
      model: a ``MiniCPMVConfig``, a preset name (``"minicpmv-2_6"``, ``"tiny"``) or a checkpoint folder
        (only its ``config.json`` is read).
      prompt_len: T, the prompt's tokens (bucketed to a power of two as generation does).
      batch: rows (bucketed likewise).
      max_new_tokens: the new-token buffer is this, bucketed (the cache has T + N slots).
      dtype: computation and parameter dtype.
      attention: the language model's attention choice (see :mod:`minicpmv_jax.attention`).
      mesh: a ``jax.sharding.Mesh`` of this process's devices to compile for, or None (one device).
      rules: the sharding rules of the parameters and activations on ``mesh``.
      prefill_chunk: as :func:`minicpmv_jax.generate.generate` takes it (None: the prompt in one pass).
    """
    for name, value, low in (("prompt_len", prompt_len, 1), ("batch", batch, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ArgumentError("{} must be an int ≥ {low}", f"{name}={value!r}", low=low)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    config = resolve_config(model)
    dtype = as_dtype(dtype)
    abstract = abstract_model(config, dtype, attention=attention)
    graphdef, state = nnx.split(abstract)
    context = sharding.ShardingContext(mesh, rules)
    if mesh is not None:
        state = sharding.abstract_with_shardings(state, mesh, rules)

    rows, t = bucket(batch, 1), bucket(prompt_len, MIN_LENGTH)
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    num_new = generate.output_length(generation)

    def placed(shape, dtype):   # an input with a leading batch axis, placed as host.put places it
        if mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(shape, mesh, rules))

    ids, mask, row_valid = placed((rows, t), jnp.int32), placed((rows, t), jnp.bool_), placed((rows,), jnp.bool_)
    key = jax.eval_shape(lambda: jax.random.key(0))
    prefill_args = (graphdef, state, ids, mask, None, None, row_valid, key)
    prefill_kwargs = dict(num_new=num_new, context=context, chunk=prefill_chunk)
    start = time.perf_counter()
    prefill = generate._prefill_jit.lower(*prefill_args, **prefill_kwargs).compile()
    prefill_memory = ProgramMemory.of(prefill, time.perf_counter() - start)

    decode_state = jax.eval_shape(lambda s, i, m, v, k: generate._prefill_jit(
        graphdef, s, i, m, None, None, v, k, **prefill_kwargs), state, ids, mask, row_valid, key)
    if mesh is not None:      # the state as the prefill leaves it: take its output shardings
        decode_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    decode_state, prefill.output_shardings)
    params = jax.eval_shape(lambda: generate.sampling_params(generation))
    stop_ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    limit = jax.ShapeDtypeStruct((), jnp.int32)
    start = time.perf_counter()
    step = generate._step_jit.lower(graphdef, state, decode_state, params, stop_ids, limit, do_sample=False,
                                    context=context).compile()
    decode_memory = ProgramMemory.of(step, time.perf_counter() - start)
    return CompiledMemory(prompt_len=prompt_len, prompt_slots=t, cache_slots=t + num_new, batch=rows,
                          dtype=jnp.dtype(dtype).name, attention=attention, backend=jax.default_backend(),
                          devices=1 if mesh is None else mesh.size, prefill=prefill_memory, decode=decode_memory)


def _size(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def format_compiled(result: CompiledMemory) -> str:
    """The ``plan --compile`` table: per program and device, arguments / outputs / temporaries."""
    r = result
    lines = [f"compiled on {r.backend} ({r.devices} device{'s' if r.devices > 1 else ''}), {r.dtype}, "
             f"attention {r.attention}: prompt {r.prompt_len} tokens -> {r.prompt_slots} slots, batch {r.batch}, "
             f"cache {r.cache_slots} slots",
             f"{'program':<10} {'arguments':>12} {'outputs':>12} {'temporaries':>12} {'aliased':>12} {'compile':>8}"]
    for name, p in (("prefill", r.prefill), ("decode", r.decode)):
        lines.append(f"{name:<10} {_size(p.argument_bytes):>12} {_size(p.output_bytes):>12} "
                     f"{_size(p.temp_bytes):>12} {_size(p.alias_bytes):>12} {p.compile_s:>7.1f}s")
    lines.append("per device; arguments hold the parameters, the cache and the inputs; temporaries are what a "
                 "program needs while it runs (XLA's memory analysis)")
    return "\n".join(lines)
