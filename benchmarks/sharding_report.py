"""Collectives and per-device memory of the compiled decode step, for each mesh of the sharding issue.

For every mesh ``(data, fsdp, tensor)`` in :data:`MESHES` (8 devices) and every batch size, lowers and
compiles ONE decode step of the Qwen2 language model at full width — the maths of
``minicpmv_jax.generate._decode`` (that function itself is called: embed one token per row, run the layers
against a KV cache of ``--cache-len`` slots, write the new slot, logits) — without materialising a single
weight:

* the model is ``nnx.eval_shape``-built (shapes and logical axes only, the fast RNG-ref way of
  ``minicpmv_jax.memory_plan.abstract_params``) and every parameter gets its ``NamedSharding`` from
  ``sharding.abstract_with_shardings``; the KV cache from ``kv_cache.shardings`` (and
  ``kv_cache.constrain`` on the written cache), tokens / positions / ``key_valid`` from
  ``sharding.batch_sharding``; the cache and ``key_valid`` are donated, as the decode loop does; the LLM
  constrains its residual stream per the rules (traced in ``sharding.use_mesh(mesh, rules)``, as the
  compiled programs of ``minicpmv_jax.generate`` are);
* the logits leave the step split only by batch (whole rows of ``[B, V]`` on each device, the layout
  top-k / top-p sampling needs), so a vocabulary split pays its all-gather inside the measured step;
* ``jax.jit(step).lower(<ShapeDtypeStructs with shardings>).compile()`` on 8 simulated CPU devices;
  ``compiled.as_text()`` is parsed for all-reduce / all-gather / reduce-scatter / collective-permute /
  all-to-all (count and bytes), ``compiled.memory_analysis()`` gives argument / output / temp bytes per
  device, and ``memory_plan.plan_memory`` the per-device parameters (all three towers) and KV cache.

Depth: compiling 28 layers per mesh takes 13–25 s on the shared 2-core machine, so by default the step is compiled
with 1 and with 2 layers (same widths) and every number is extrapolated linearly,
``v(L) = v(2) + (L - 2) · (v(2) - v(1))``: the layers are identical, so ``v(2) - v(1)`` is exactly one
layer's share and ``2 · v(1) - v(2)`` the once-per-step share (embedding, final norm, lm_head).
``--check`` also compiles one mesh at full depth and asserts that the extrapolation gives the same numbers
(temporaries within 5 %: buffer assignment is not exactly linear); ``--full-depth`` compiles every
configuration at full depth instead. Compiles skip LLVM's optimisations (:data:`COMPILER_OPTIONS`): the
program is never run, and the partitioned HLO and its buffers do not depend on them.

How bytes are counted (per device, from the result shapes and dtypes of the partitioned HLO):

* all-reduce, collective-permute, all-to-all: the buffer (operand = result; every element of a tuple op);
* all-gather: the gathered result; reduce-scatter: its operand (= result × group size);
* "link" (an estimate of the bytes each device sends per step with ring algorithms over a group of g):
  all-reduce 2(g-1)/g × buffer, all-gather and all-to-all (g-1)/g × buffer, reduce-scatter
  (g-1)/g × operand, collective-permute the buffer.
An HLO instruction is one op even when XLA combined several arrays into a tuple (e.g. q, k, v together).
XLA:CPU computes bf16 arithmetic in float32 and promotes bf16 all-reduces to float32 (``*_promoted``
reducers), so activation collectives show up as f32 here; on TPU / GPU the bf16 ones move half the
bytes. The attention-logit and lm_head-logit reductions are float32 in the model itself. The temp size is
also XLA:CPU's: it includes float32 copies of the bf16 weights the CPU dot kernels work on.

A collective whose operand is (a convert / copy / reshape of) a parameter is a *weight* collective — a
weight moved on every token — and is counted separately ("weight colls"; ``--detail`` names the parameter).

Besides the default :data:`minicpmv_jax.sharding.RULES`, the rejected alternatives documented in ``sharding/rules.py``
are compiled on the meshes where they differ (:data:`ALTERNATIVES`), with the default rows repeated next to
them: among them the step without any activation constraint (XLA's own layout) and with
:data:`minicpmv_jax.sharding.TRAINING_RULES` (residual stream split by batch over fsdp, weights gathered).

    python benchmarks/sharding_report.py --check          # full size, batches 1 and 8, 4096 slots (~2 min)
    python benchmarks/sharding_report.py --small          # tiny config (compiles as many programs: ~1 min)
    python benchmarks/sharding_report.py --detail --meshes 1x1x8 --batch 1   # every collective, per layer
"""

from __future__ import annotations

import os

# 8 simulated CPU devices; read when the backend starts, so before jax is used (see tests/conftest.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from minicpmv_jax import memory_plan, sharding  # noqa: E402
from minicpmv_jax import generate, kv_cache  # noqa: E402
from minicpmv_jax.config import minicpmv_2_6, tiny  # noqa: E402
from minicpmv_jax.qwen2 import Qwen2  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4))
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "collective-permute": "CP",
         "all-to-all": "A2A"}
MB, GiB = 1e6, 2 ** 30
#: The program is never run: skip LLVM's optimisations (halves the compile time; the partitioned HLO, its
#: collectives and the buffer sizes are the same — checked on the full-size (1, 2, 4) step).
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A rules table to compare: a base table (the default ``sharding.RULES``) with some logical names
    re-mapped, and whether the LLM constrains its residual stream at all (traced inside
    ``sharding.use_mesh(mesh, rules)`` or not)."""

    name: str
    overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()
    meshes: tuple[tuple[int, int, int], ...] | None = None   # None: every mesh of the run
    base: sharding.Rules = sharding.RULES
    constrain: bool = True

    @property
    def rules(self) -> sharding.Rules:
        return sharding.override_rules(self.base, dict(self.overrides))


DEFAULT = Variant("default")
_FSDP_MESHES = ((1, 8, 1), (2, 2, 2), (1, 2, 4))
#: Alternatives to the choices argued in ``sharding/rules.py``, on the meshes where they differ from the default.
ALTERNATIVES = (
    Variant("attention not split, KV cache replicated",
            (("head_dim", ()), ("act_head_dim", ()), ("cache_head_dim", ())), ((1, 1, 8),)),
    Variant("embedding + lm_head replicated over tensor", (("embed", ("fsdp",)),), ((1, 1, 8),)),
    Variant("vocab not split (lm_head split on D)", (("vocab", ()), ("act_vocab", ())), ((2, 2, 2),)),
    Variant("no activation constraints", meshes=((1, 1, 8), *_FSDP_MESHES), constrain=False),
    Variant("TRAINING_RULES (weights gathered)", meshes=_FSDP_MESHES, base=sharding.TRAINING_RULES),
)


# --------------------------------------------------------------------------- compiling one step


@functools.lru_cache(maxsize=8)
def _abstract_llm(llm_cfg, quantization=None) -> nnx.Module:
    """The Qwen2 tower as shapes only (bfloat16), built like ``minicpmv_jax.model.abstract_model``."""
    def build():
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return Qwen2(llm_cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs, quantization=quantization)

    return nnx.eval_shape(build)


def compile_decode_step(llm_cfg, mesh, batch: int, cache_len: int, rules: sharding.Rules = sharding.RULES,
                        constrain: bool = True, quantization=None):
    """``jax.jit(step).lower(...).compile()`` of one decode step on ``mesh`` (abstract inputs only); the
    residual stream is constrained per ``rules`` (traced in ``sharding.use_mesh(mesh, rules)``, as
    ``generate``'s programs are), unless ``constrain=False``. ``quantization``: the projections'
    (:class:`minicpmv_jax.quantization.QuantizationConfig`, None: bfloat16)."""
    abstract = _abstract_llm(llm_cfg, quantization)
    graphdef = nnx.graphdef(abstract)
    params = sharding.abstract_with_shardings(abstract, mesh, rules)
    abstract_cache = jax.eval_shape(lambda: kv_cache.KVCache.zeros(llm_cfg, batch, cache_len))
    cache_shardings = kv_cache.shardings(abstract_cache, mesh, rules)
    cache = jax.tree.map(lambda b, s: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=s), abstract_cache,
                         cache_shardings)

    def batched(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(shape, mesh, rules))

    tokens, positions = batched((batch,), jnp.int32), batched((batch,), jnp.int32)
    key_valid = batched((batch, cache_len), jnp.bool_)
    write_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    logits_sharding = sharding.batch_sharding((batch, llm_cfg.vocab_size), mesh, rules)

    def step(params, tokens, positions, cache, key_valid, write_index):
        llm = nnx.merge(graphdef, params)
        with sharding.use_mesh(mesh if constrain else None, rules):
            logits, cache, key_valid = generate._decode(types.SimpleNamespace(llm=llm), tokens, positions, cache,
                                                        key_valid, write_index)
        with sharding.use_mesh(mesh, rules):       # the written cache keeps its layout in every variant
            cache = kv_cache.constrain(cache)
        return logits, cache, key_valid

    jitted = jax.jit(step, donate_argnums=(3, 4),
                     out_shardings=(logits_sharding, cache_shardings, key_valid.sharding))
    return jitted.lower(params, tokens, positions, cache, key_valid, write_index).compile(COMPILER_OPTIONS)


# --------------------------------------------------------------------------- reading the HLO

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
             "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([a-z][a-z0-9-]*)\((.*?)\)(.*)$")
_OPERAND_RE = re.compile(r"%([^\s,()]+)")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_FOLLOW = {"convert", "copy", "bitcast", "reshape", "transpose", "get-tuple-element", "bitcast-convert"}


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY_RE.findall(shape_text)
            if dt in _ITEMSIZE]


def _nbytes(arrays) -> int:
    return sum(_ITEMSIZE[dt] * math.prod(dims) for dt, dims in arrays)


def _group_size(attrs: str, num_devices: int) -> int:
    """Devices per replica group, from any of the three printed forms (mesh axes, explicit, iota)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {k.strip("'"): int(v) for k, v in re.findall(r"('[^']+')=(\d+)", m.group(1))}
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    return num_devices


@dataclasses.dataclass(frozen=True)
class Op:
    """One collective instruction of the partitioned program."""

    kind: str
    shapes: str        # result shape(s), layouts dropped
    group: int         # devices per replica group (collective-permute: 0)
    nbytes: int        # see the module docstring
    link_bytes: float  # ring estimate of bytes sent per device
    source: str        # the jax op it came from (metadata op_name)
    weight: str        # the parameter it moves, or ""


def collectives(hlo: str, num_devices: int) -> list[Op]:
    """Every collective instruction of ``hlo`` (``compiled.as_text()``); ``*-done`` halves are skipped."""
    instrs = {}
    for line in hlo.splitlines():
        m = _INSTR_RE.match(line)
        if m:
            instrs[m.group(1)] = m.groups()[1:]
    ops = []
    for name, (shape, opcode, operands, attrs) in instrs.items():
        kind = opcode.removesuffix("-start")
        if kind not in KINDS:
            continue
        arrays = _arrays(shape)
        if opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
            arrays = [max(arrays, key=lambda a: math.prod(a[1]))]   # (operand, result[, contexts]) tuple
        size = _nbytes(arrays)
        if kind == "collective-permute":
            group, link = 0, float(size)
        else:
            group = _group_size(attrs, num_devices)
            if kind == "reduce-scatter":
                size *= group
            link = size * (group - 1) / group * (2 if kind == "all-reduce" else 1)
        op_name = _OP_NAME_RE.search(attrs)
        source = op_name.group(1).split("/", 1)[-1] if op_name else ""
        shapes = ", ".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in arrays)
        ops.append(Op(kind, shapes, group, size, link, source, _weight_of(operands, instrs)))
    return ops


def _weight_of(operands: str, instrs: dict) -> str:
    """The parameter a collective's operand is a plain copy / convert / reshape of (else "")."""
    frontier, seen = _OPERAND_RE.findall(operands), set()
    for _ in range(6):
        nxt = []
        for name in frontier:
            if name in seen or name not in instrs:
                continue
            seen.add(name)
            _, opcode, ops, attrs = instrs[name]
            args = _OPERAND_RE.findall(ops)
            if opcode == "parameter":
                m = _OP_NAME_RE.search(attrs)
                if m and m.group(1).startswith("params"):   # params['layers'][3]['attn']['q']['kernel'].value
                    keys = re.findall(r"\[\\?'?([^\]']+?)\\?'?\]", m.group(1))
                    return ".".join("i" if k.isdigit() else k for k in keys)   # layers.i.attn.q.kernel
            elif opcode in _FOLLOW or (opcode == "fusion" and len(args) == 1):
                nxt += args
        frontier = nxt
    return ""


# --------------------------------------------------------------------------- one measurement


def _summary(ops: list[Op], memory) -> dict[str, float]:
    """Flat numbers of one compiled program (everything linear in the number of layers)."""
    out: dict[str, float] = {}
    for kind in KINDS:
        mine = [o for o in ops if o.kind == kind]
        out[f"{kind}.n"] = len(mine)
        out[f"{kind}.bytes"] = sum(o.nbytes for o in mine)
    out["link_bytes"] = sum(o.link_bytes for o in ops)
    weights = [o for o in ops if o.weight]
    out["weight.n"], out["weight.bytes"] = len(weights), sum(o.nbytes for o in weights)
    for key in ("argument", "output", "alias", "temp"):
        out[f"mem.{key}"] = getattr(memory, f"{key}_size_in_bytes")
    return out


def _signatures(ops: list[Op]) -> collections.Counter:
    return collections.Counter((o.kind, o.shapes, o.group, o.source, o.weight) for o in ops)


@dataclasses.dataclass
class Row:
    """One (mesh, rules, batch) configuration, extrapolated (or compiled) at the model's full depth."""

    mesh: tuple[int, int, int]
    variant: str
    batch: int
    layers: int
    compiled_layers: tuple[int, ...]
    numbers: dict[str, float]
    per_layer: list[tuple[tuple, int]]   # (signature, count) of one layer
    once: list[tuple[tuple, int]]        # (signature, count) once per step
    plan: dict[str, float]
    compile_s: float


def measure(cfg, shape, variant: Variant, batch: int, cache_len: int, full_depth: bool = False) -> Row:
    llm = cfg.llm
    mesh = sharding.make_mesh(*shape)
    rules = variant.rules
    depths = (llm.num_hidden_layers,) if full_depth else (1, 2)
    t0 = time.perf_counter()
    results = []
    for depth in depths:
        compiled = compile_decode_step(dataclasses.replace(llm, num_hidden_layers=depth), mesh, batch, cache_len,
                                       rules, variant.constrain)
        ops = collectives(compiled.as_text(), mesh.size)
        results.append((_summary(ops, compiled.memory_analysis()), _signatures(ops)))
    elapsed = time.perf_counter() - t0
    if full_depth:
        numbers, sigs = results[0]
        per_layer, once = [], sorted(sigs.items())
    else:
        (n1, s1), (n2, s2) = results
        extra = llm.num_hidden_layers - 2
        numbers = {k: n2[k] + extra * (n2[k] - n1[k]) for k in n2}
        layer = {k: s2[k] - s1[k] for k in s1 | s2}
        fixed = {k: s1[k] - layer[k] for k in s1 | s2}
        if any(v < 0 for v in (*layer.values(), *fixed.values())):
            print(f"warning: {shape} {variant.name} B={batch}: the 1- and 2-layer programs differ by more than "
                  "one layer; the extrapolation is approximate", file=sys.stderr)
        per_layer = sorted((k, v) for k, v in layer.items() if v)
        once = sorted((k, v) for k, v in fixed.items() if v)
    plan = memory_plan.plan_memory(cfg, shape, batch=batch, max_len=cache_len, rules=rules)
    llm_tower = next(t for t in plan.towers if t.name == "llm")
    plan_numbers = {"params": plan.param_bytes_per_device, "llm_params": llm_tower.per_device_bytes,
                    "kv": plan.kv_cache_bytes_per_device}
    # The step's arguments are the LLM's parameters and the cache (+ a few [B] / [B, S] inputs): the
    # compiled program must hold exactly the pieces the plan predicts, nothing replicated on entry.
    planned = plan_numbers["llm_params"] + plan_numbers["kv"]
    inputs = batch * (cache_len + 8) + 4
    if not planned <= numbers["mem.argument"] <= planned + inputs:
        print(f"warning: {shape} {variant.name} B={batch}: compiled arguments {numbers['mem.argument']:,.0f} B per "
              f"device, the plan says {planned:,} B + at most {inputs:,} B of inputs", file=sys.stderr)
    return Row(tuple(shape), variant.name, batch, llm.num_hidden_layers, depths, numbers, per_layer, once,
               plan_numbers, elapsed)


# --------------------------------------------------------------------------- output


def num_ops(row: Row) -> int:
    """Collective instructions per step (each costs at least one link latency)."""
    return int(sum(row.numbers[f"{kind}.n"] for kind in KINDS))


def _cell(row: Row, kind: str) -> str:
    n, b = int(row.numbers[f"{kind}.n"]), row.numbers[f"{kind}.bytes"]
    return "0" if n == 0 else f"{n} / {b / MB:.3g}"


def format_table(rows: list[Row]) -> str:
    """A markdown table: collectives per step (count / MB per device) and per-device memory."""
    head = ["mesh d,f,t", "rules", "B", *(f"{SHORT[k]} n / MB" for k in KINDS), "ops", "link MB/dev",
            "weight colls", "params/dev GiB (plan, 3 towers)", "KV/dev GiB (plan)", "step args/dev GiB",
            "temp/dev GiB (XLA:CPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [",".join(map(str, r.mesh)), r.variant, str(r.batch), *(_cell(r, k) for k in KINDS),
                 str(num_ops(r)), f"{r.numbers['link_bytes'] / MB:.3g}", f"{int(r.numbers['weight.n'])}",
                 f"{r.plan['params'] / GiB:.2f}", f"{r.plan['kv'] / GiB:.3f}",
                 f"{r.numbers['mem.argument'] / GiB:.2f}", f"{r.numbers['mem.temp'] / GiB:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_detail(row: Row) -> str:
    """Every distinct collective of one configuration: per layer and once per step."""
    lines = [f"mesh {row.mesh} rules={row.variant!r} B={row.batch}:"]
    for title, items in (("per layer", row.per_layer), ("once per step", row.once)):
        lines.append(f"  {title}:")
        for (kind, shapes, group, source, weight), n in items:
            extra = f"  WEIGHT {weight}" if weight else ""
            lines.append(f"    {n} × {kind:18} {shapes:50} group {group}  {source}{extra}")
    return "\n".join(lines)


def check_extrapolation(cfg, shape, batch, cache_len) -> None:
    """Compiles ``shape``/``batch`` at full depth and asserts the 1-/2-layer extrapolation is exact."""
    a = measure(cfg, shape, DEFAULT, batch, cache_len)
    b = measure(cfg, shape, DEFAULT, batch, cache_len, full_depth=True)
    # Temporaries depend on XLA's buffer assignment: linear to within a few per cent, not exactly.
    diff = {k: (a.numbers[k], b.numbers[k]) for k in a.numbers
            if not math.isclose(a.numbers[k], b.numbers[k], rel_tol=0.05 if k == "mem.temp" else 1e-12)}
    if diff:
        raise AssertionError(f"extrapolated ≠ compiled at {cfg.llm.num_hidden_layers} layers for {shape} B={batch}: "
                             f"{diff}")
    print(f"check: {shape} B={batch}: the {cfg.llm.num_hidden_layers}-layer compile ({b.compile_s:.1f} s) equals "
          f"the extrapolation from 1 and 2 layers ({a.compile_s:.1f} s) in every number (temp: "
          f"{a.numbers['mem.temp'] / b.numbers['mem.temp'] - 1:+.2%})")


def _parse_mesh(text: str) -> tuple[int, int, int]:
    shape = sharding.parse_mesh_shape(text)
    if math.prod(shape) != 8 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"mesh {text!r}: expected three positive sizes whose product is 8")
    return shape


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the tiny test config instead of the full size")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--cache-len", type=int, default=None, help="KV cache slots (default 4096; --small: 256)")
    p.add_argument("--meshes", type=_parse_mesh, nargs="+", default=list(MESHES), help="DxFxT meshes of 8")
    p.add_argument("--no-alternatives", action="store_true", help="only the default rules")
    p.add_argument("--full-depth", action="store_true", help="compile every layer instead of extrapolating")
    p.add_argument("--check", type=_parse_mesh, nargs="?", const=(1, 1, 8), metavar="DxFxT",
                   help="also compile this mesh (default 1x1x8) at the first batch size at full depth and assert "
                        "that the extrapolation from 1 and 2 layers gives the same numbers")
    p.add_argument("--detail", action="store_true", help="list every collective per layer / per step")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    if len(jax.devices()) < 8:
        raise SystemExit(f"needs 8 devices, found {len(jax.devices())}: set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8 before jax starts (this script does it when it is "
                         "imported first)")
    cfg = tiny() if args.small else minicpmv_2_6()
    cache_len = args.cache_len or (256 if args.small else 4096)
    t0 = time.perf_counter()
    if args.check is not None:
        check_extrapolation(cfg, args.check, args.batch[0], cache_len)
    rows = []
    variants = [DEFAULT] + ([] if args.no_alternatives else list(ALTERNATIVES))
    for variant in variants:
        for shape in args.meshes:
            if variant.meshes is not None and shape not in variant.meshes:
                continue
            for batch in args.batch:
                row = measure(cfg, shape, variant, batch, cache_len, full_depth=args.full_depth)
                rows.append(row)
                print(f"  {shape} {variant.name} B={batch}: compiled in {row.compile_s:.1f} s", file=sys.stderr)
    llm = cfg.llm
    how = (f"compiled at {llm.num_hidden_layers} layers" if args.full_depth else
           f"extrapolated to {llm.num_hidden_layers} layers from 1- and 2-layer compiles")
    print(f"\nDecode step, {'tiny' if args.small else 'MiniCPM-V 2.6'} Qwen2 (D={llm.hidden_size}, "
          f"N={llm.num_attention_heads}, K={llm.num_key_value_heads}, F={llm.intermediate_size}, "
          f"V={llm.vocab_size}), bf16, KV cache {cache_len} slots, 8 CPU devices, {how}; "
          "collectives: count / MB per device per step\n")
    defaults = [r for r in rows if r.variant == DEFAULT.name]
    print(format_table(defaults))
    others = [r for r in rows if r.variant != DEFAULT.name]
    if others:
        print("\nAlternative rules, next to the default on the same mesh:\n")
        meshes = dict.fromkeys(r.mesh for r in others)
        print(format_table([r for mesh in meshes for r in defaults + others if r.mesh == mesh]))
    if args.detail:
        print()
        for row in rows:
            print(format_detail(row))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"config": "tiny" if args.small else "minicpmv_2_6", "cache_len": cache_len,
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
