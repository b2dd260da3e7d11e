"""Floors, ratios and goals from both sides' results, and the table (console and markdown) of ``bench.py``."""

from __future__ import annotations

import os
import subprocess

from bench_common import GB, ROOT, Plan


def git_commit() -> str:
    """Short HEAD commit (+ a note when tracked files differ), or $MINICPMV_COMMIT where there is no git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            raise OSError(head.stderr)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("MINICPMV_COMMIT", "unknown (no git)")


def gpu_line() -> str:
    """``name, memory, driver`` of the first GPU from nvidia-smi, or "" without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


def derive(plan: Plan, jx: dict, th: dict) -> dict:
    """Floors, ratios and goals from the two sides' results (missing measurements give None)."""
    out: dict = {"decode": {}}
    bw = jx.get("copy_bw_GBs")
    sizes = jx.get("bytes")
    for b in plan.batches:
        key = f"decode_b{b}"
        j, t = jx.get(key), th.get(key)
        row = {"jax_step_ms": j and j["step_ms"], "torch_step_ms": t and t["step_ms"],
               "jax_tok_s": j and j["tok_s"], "torch_tok_s": t and t["tok_s"]}
        if j and t and j["step_ms"] > 0 and t["step_ms"] > 0:
            row["speedup"] = t["step_ms"] / j["step_ms"]
        if j and bw and sizes:
            context = j["context"] + plan.new_tokens / 2                # valid slots, mean over the steps
            read = sizes["llm"] - sizes["embed"] + b * context * jx["kv_bytes_per_token"]
            row["floor_bytes"] = read
            row["floor_ms"] = read / (bw * GB) * 1e3
            row["floor_fraction"] = row["floor_ms"] / j["step_ms"] if j["step_ms"] > 0 else None
            if jx.get("read_bw_GBs"):
                row["floor_ms_read_bw"] = read / (jx["read_bw_GBs"] * GB) * 1e3
        out["decode"][b] = row
    quantized = jx.get("quantized") or {}
    base = quantized.get("bfloat16", {})
    out["quantized"] = {}
    for mode, q in quantized.items():
        for b in (1, 8):
            r = q.get(f"b{b}")
            if not r:
                continue
            row = {"step_ms": r["step_ms"], "tok_s": r["tok_s"]}
            ref = base.get(f"b{b}")
            if ref and r["step_ms"] > 0 and ref["step_ms"] > 0:
                row["vs_bf16"] = ref["step_ms"] / r["step_ms"]
            if bw:
                context = r["context"] + plan.new_tokens / 2
                read = q["llm_bytes"] - q["embed_bytes"] + b * context * jx["kv_bytes_per_token"]
                row["floor_ms"] = read / (bw * GB) * 1e3
                row["floor_fraction"] = row["floor_ms"] / r["step_ms"] if r["step_ms"] > 0 else None
            out["quantized"][f"{mode}_b{b}"] = row
    int8 = out["quantized"].get("int8_b1", {})
    out["quantized_goals"] = {
        "int8_b1_vs_bf16": int8.get("vs_bf16"), "int8_b1_vs_bf16_goal": 1.6,
        "int8_b1_floor_fraction": int8.get("floor_fraction"), "int8_b1_floor_goal": 0.85}
    one = out["decode"].get(1, {})
    out["goals"] = {"b1_floor_fraction": one.get("floor_fraction"), "b1_floor_goal": 0.85,
                    "b1_floor_met": None if one.get("floor_fraction") is None else one["floor_fraction"] >= 0.85,
                    "b1_speedup": one.get("speedup"), "b1_speedup_goal": 3.0,
                    "b1_speedup_met": None if one.get("speedup") is None else one["speedup"] >= 3.0}
    return out


def _fmt(x, spec, suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def render(plan: Plan, meta: dict, jx: dict, th: dict, der: dict) -> tuple[str, str]:
    """(console text, markdown section)."""
    get = lambda d, *ks: _dig(d, ks)  # noqa: E731
    rows = []
    jt, tt = get(jx, "ttft", "median_s"), get(th, "ttft", "median_s")
    either = lambda *ks: get(jx, *ks) or get(th, *ks) or "?"  # noqa: E731
    rows.append((f"time to first token, {plan.image_size}² image ({either('ttft', 'pieces')} pieces, "
                 f"{either('ttft', 'prompt_tokens')}-token prompt)",
                 _fmt(jt and jt * 1e3, ".0f", " ms"), _fmt(tt and tt * 1e3, ".0f", " ms"),
                 _fmt(jt and tt and tt / jt, ".2f", "×"), "—", "—"))
    jv, tv = get(jx, "vision", "pieces_s"), get(th, "vision", "pieces_s")
    vision_cell = lambda d: ("—" if not get(d, "vision", "pieces_s") else  # noqa: E731
                             f"{d['vision']['pieces_s']:.1f} pieces/s ({d['vision']['median_s'] * 1e3:.1f} ms)")
    rows.append((f"vision encoder + resampler, {either('vision', 'pieces')} pieces of 448² "
                 f"(JAX as a batch of {get(jx, 'vision', 'batch') or '?'}, PyTorch one at a time)",
                 vision_cell(jx), vision_cell(th), _fmt(jv and tv and jv / tv, ".2f", "×"), "—", "—"))
    jp, tp = get(jx, "prefill", "tok_s"), get(th, "prefill", "tok_s")
    prefill_cell = lambda d: ("—" if not get(d, "prefill", "tok_s") else  # noqa: E731
                              f"{d['prefill']['median_s'] * 1e3:.1f} ms ({d['prefill']['tok_s'] / 1e3:.1f} k tok/s)")
    rows.append((f"prefill {plan.prefill_tokens} tokens, batch 1", prefill_cell(jx), prefill_cell(th),
                 _fmt(jp and tp and jp / tp, ".2f", "×"), "—", "—"))
    for b in plan.batches:
        r = der["decode"][b]
        ctx = either(f"decode_b{b}", "context")
        cell = lambda ms, tok: ("—" if ms is None else f"{ms:.2f} ms/step "  # noqa: E731
                                + (f"({tok:.0f} tok/s)" if tok else "(≤ 0: timing noise)"))
        kind = either(f"decode_b{b}", "prompt")
        rows.append((f"decode batch {b} ({kind} context {ctx} + {plan.new_tokens} new)",
                     cell(r["jax_step_ms"], r["jax_tok_s"]), cell(r["torch_step_ms"], r["torch_tok_s"]),
                     _fmt(r.get("speedup"), ".2f", "×"), _fmt(r.get("floor_ms"), ".2f", " ms"),
                     _fmt(r.get("floor_fraction") and r["floor_fraction"] * 100, ".0f", " %")))
    served = jx.get("serve_b8")
    if served:
        rows.append((f"serving engine, {served['slots']} slots busy ({served['prompt_tokens']}-token prompts, "
                     f"{served['new_tokens']} new; whole load {served['tok_s']:.0f} tok/s)",
                     f"{served['step_ms']:.2f} ms/step ({served['step_tok_s']:.0f} tok/s; "
                     f"{served['vs_vllm_452']:.2f}× vLLM's 452)", "—", "—", "—", "—"))
    for key, r in der.get("quantized", {}).items():
        mode, b = key.split("_b")
        rows.append((f"decode batch {b}, {mode} weights (text context; vs the same in bfloat16)",
                     f"{r['step_ms']:.2f} ms/step" + (f" ({r['tok_s']:.0f} tok/s)" if r.get("tok_s") else ""),
                     "—", _fmt(r.get("vs_bf16"), ".2f", "× bf16"), _fmt(r.get("floor_ms"), ".2f", " ms"),
                     _fmt(r.get("floor_fraction") and r["floor_fraction"] * 100, ".0f", " %")))
    video = jx.get("video_ttft")
    if video:
        rows.append((f"time to first token, {video['frames']}-frame video ({video['pieces']} pieces, "
                     f"{video['prompt_tokens']}-token prompt run as {video['padded_tokens']})",
                     _fmt(video["median_s"] * 1e3, ".0f", " ms"), "—", "—", "—", "—"))
    for key, r in (jx.get("long_prefill") or {}).items():
        attention, t = key.rsplit("_T", 1)
        cell = r.get("error", "")[:60] if "error" in r else f"{r['median_s'] * 1e3:.0f} ms ({r['tok_s'] / 1e3:.1f} k tok/s)"
        rows.append((f"prefill {t} tokens, attention {attention!r}", cell, "—", "—", "—", "—"))
    jm, tm = jx.get("peak_mem_bytes"), th.get("peak_mem_bytes")
    rows.append(("peak GPU memory" if jx.get("platform") != "cpu" else "peak memory (host RSS: CPU run)",
                 _fmt(jm and jm / GB, ".1f", " GB"), _fmt(tm and tm / GB, ".1f", " GB"), "—", "—", "—"))
    header = ("measurement", "JAX", "PyTorch", "JAX speed-up", "bandwidth floor", "floor reached")
    md_table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    md_table += ["| " + " | ".join(r) + " |" for r in rows]

    g = der["goals"]
    verdict = lambda met: "—" if met is None else ("met" if met else "NOT met")  # noqa: E731
    fraction = g["b1_floor_fraction"] and g["b1_floor_fraction"] * 100
    goals = (f"Goals, batch-1 decode: {_fmt(fraction, '.0f', ' %')} of the bandwidth floor "
             f"(goal ≥ 85 %: {verdict(g['b1_floor_met'])}); {_fmt(g['b1_speedup'], '.2f', '×')} the PyTorch "
             f"reference (goal ≥ 3×: {verdict(g['b1_speedup_met'])}).")
    qg = der.get("quantized_goals") or {}
    if qg.get("int8_b1_vs_bf16") is not None or qg.get("int8_b1_floor_fraction") is not None:
        ratio, floor = qg.get("int8_b1_vs_bf16"), qg.get("int8_b1_floor_fraction")
        goals += (f" int8 batch-1 decode: {_fmt(ratio, '.2f', '×')} bfloat16's speed (goal ≥ 1.6×: "
                  f"{verdict(None if ratio is None else ratio >= 1.6)}), {_fmt(floor and floor * 100, '.0f', ' %')} "
                  f"of its bandwidth floor (goal ≥ 85 %: {verdict(None if floor is None else floor >= 0.85)}).")
    stages = []
    for side, d in (("JAX", jx), ("PyTorch", th)):
        s = d.get("ttft")
        if s:
            stages.append(f"{side} TTFT stages (medians): preprocess {s['preprocess_ms']:.0f} ms, vision "
                          f"{s['vision_ms']:.0f} ms, prefill + first token {s['prefill_first_ms']:.0f} ms "
                          f"(prompt run as {s['padded_tokens']} tokens)")
    times = []
    for side, d in (("JAX", jx), ("PyTorch", th)):
        if d.get("phase_s"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in d["phase_s"].items())
            first = ", ".join(f"{k} {v:.1f}" for k, v in d.get("first_call_s", {}).items())
            what_first = "incl. tracing and XLA compilation" if side == "JAX" else "warm-up"
            times.append(f"{side} phases (s): {parts}; first calls (s, {what_first}): {first}; "
                         f"process {meta['wall_s'].get('jax' if side == 'JAX' else 'torch', 0):.0f} s")
    if jx.get("split_ms") is not None:
        times.append(f"JAX host overhead: nnx.split of the model takes {jx['split_ms']:.1f} ms, paid by every "
                     f"generate / prefill / encode_pieces_packed call (inside the TTFT)")
    problems = []
    for side, d in (("JAX", jx), ("PyTorch", th)):
        for k, e in d.get("errors", {}).items():
            problems.append(f"{side} {k} FAILED: {e}")
        if d.get("skipped"):
            problems.append(f"{side} skipped (out of time): {', '.join(d['skipped'])}")
        if d.get("fatal"):
            problems.append(f"{side}: {d['fatal']}")
    weights = get(jx, "bytes", "llm") and (jx["bytes"]["llm"] - jx["bytes"]["embed"]) / GB
    floor_note = (f"Bandwidth floor = bytes a decode step must read (language-model weights without the embedding "
                  f"table, {_fmt(weights, '.2f', ' GB')}, "
                  f"+ the valid K/V) / the device copy bandwidth measured by JAX, "
                  f"{_fmt(jx.get('copy_bw_GBs'), '.0f', ' GB/s')} (read + write; PyTorch's copy "
                  f"{_fmt(th.get('copy_bw_GBs'), '.0f', ' GB/s')}; JAX read-only reduction "
                  f"{_fmt(jx.get('read_bw_GBs'), '.0f', ' GB/s')}).")
    what = ("JAX: `generate.generate` (prefill + decode loop in one jit, greedy), `generate.prepare_batch` for the "
            "image; PyTorch: transformers `Qwen2ForCausalLM` (attention "
            f"{th.get('attn_implementation', '?')}, eager, {th.get('cache', '?')}) `generate`, the torch "
            "SigLIP/resampler reference one piece at a time. "
            f"Decode step = (t({plan.new_tokens} new) − t(1 new)) / {plan.new_tokens - 1}; medians of up to "
            f"{plan.repeats} calls.")
    md = ["## MiniCPM-V 2.6 at full size, random bfloat16 weights — `benchmarks/gpu/bench.py`"
          + (" (--small: tiny config on CPU, not a result)" if plan.small else ""), "",
          f"- Card: {meta['card']}; date {meta['date']}.",
          f"- Code: commit `{meta['commit']}`.",
          f"- Software: jax {jx.get('jax', '?')}, flax {jx.get('flax', '?')}, torch {th.get('torch', '?')}, "
          f"transformers {th.get('transformers', '?')}.",
          f"- What runs: {what}", "", *md_table, "", goals, "", floor_note, "",
          *[f"- {s}" for s in stages + times + problems]]
    text = "\n".join([f"card: {meta['card']}   date: {meta['date']}   commit: {meta['commit']}", "",
                      *md_table, "", goals, floor_note, *stages, *times, *problems])
    return text, "\n".join(md) + "\n"


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


