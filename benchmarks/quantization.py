"""Weight-only int8 / int4 quantization (issue 18): accuracy, parameter bytes, peak memory while loading,
and decode speed on this machine's CPU, each against the unquantized model measured in the same run.

Models (random weights with the tests' realistic spread, ``minicpmv_jax.testing.checkpoint``), each written
as an HF-layout checkpoint in a temporary folder:

* the tests' tiny checkpoint (3 layers, hidden 128, the real vocabulary);
* a Qwen2-0.5B-shaped language model (24 layers, hidden 896, 14/2 heads, MLP 4864, vocabulary 151 936) with
  the tiny vision tower (``--layers`` fewer for a quick look).

Reported:

* **accuracy** against the float32 model on text (``--positions`` positions of random token rows) and on an
  image prompt (a sliced noise image), and on held-out English text: the logits' relative error
  ``‖q − f‖ / ‖f‖``, top-1 agreement, the mean KL divergence ``KL(f ‖ q)`` per position, and the
  perplexity change on the held-out text;
* **parameter bytes** of the language model (an int4 element counted as half a byte, as TPU / GPU
  memory holds it) against bfloat16;
* **peak host memory while loading** (``from_pretrained`` in a child process, ``ru_maxrss``) of a
  bfloat16 checkpoint as bfloat16, int8 and int4;
* **decode speed on CPU**: the compiled loop's time per token at batch 1 and 8, ``(t(17 new) − t(1 new)) / 16``,
  for bfloat16, int8 and int4 (computation in bfloat16) and float32.

    python benchmarks/quantization.py                 # a few minutes on 2 cores
    python benchmarks/quantization.py --small         # 2 layers of the 0.5B shape: a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import qwen2_05b  # noqa: E402
from serve_load import engine_step_time, loop_per_token  # noqa: E402
from minicpmv_jax import MiniCPMV, MiniCPMVProcessor  # noqa: E402
from minicpmv_jax.config import tiny  # noqa: E402
from minicpmv_jax.processor import IMAGE_TAG  # noqa: E402

MODES = ("int8", "int4")

HELD_OUT = (
    "The lighthouse stood at the end of a long stone pier, and every evening the keeper climbed its spiral "
    "stairs to light the lamp. Ships passing in the night relied on its steady beam to find the harbour "
    "entrance between the rocks. In winter the storms were fierce, waves broke over the pier, and the keeper "
    "sometimes waited for hours before it was safe to walk back to the cottage on the shore. Over the years "
    "he kept a journal of the weather, the ships he saw and the birds that rested on the railing, and when "
    "he retired the town library put the journals on display so that children could read about the sea.")


def write_folder(cfg, dtype: str) -> str:
    from minicpmv_jax.testing.checkpoint import write_checkpoint
    from minicpmv_jax.testing.tokenizer_files import write_tokenizer_files

    folder = tempfile.mkdtemp(prefix=f"quant_bench_{dtype}_")
    write_checkpoint(folder, cfg, seed=1234, num_shards=2, dtype=dtype)
    write_tokenizer_files(folder)
    return folder


# --------------------------------------------------------------------------- accuracy


def batches(processor, vocab: int, positions: int) -> dict[str, list[dict]]:
    rows = max(1, positions // 128)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, min(vocab, 150000), (rows, 128)).astype(np.int32)
    text = {"input_ids": ids, "attention_mask": np.ones_like(ids, bool)}
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": IMAGE_TAG + "\nWhat is in this picture?"}], add_generation_prompt=True)
    rgb = np.random.default_rng(3).integers(0, 256, (460, 700, 3), dtype=np.uint8)
    from PIL import Image
    image = processor([prompt], [[Image.fromarray(rgb)]], max_slice_nums=4)
    held = processor.tokenizer.encode(HELD_OUT)
    held = {"input_ids": np.asarray([held], np.int32), "attention_mask": np.ones((1, len(held)), bool)}
    return {"random text": [text], "image prompt": [image], "held-out text": [held]}


def logits_of(model, group: list[dict]) -> np.ndarray:
    out = []
    for batch in group:
        mask = np.asarray(batch["attention_mask"]).astype(bool)
        out.append(np.asarray(model.compute_logits(batch))[mask])
    return np.concatenate(out)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(f: np.ndarray, q: np.ndarray) -> dict:
    lf, lq = log_softmax(f.astype(np.float64)), log_softmax(q.astype(np.float64))
    return {"rel": float(np.linalg.norm(q - f) / np.linalg.norm(f)), "top1": float((f.argmax(-1) == q.argmax(-1)).mean()),
            "kl": float((np.exp(lf) * (lf - lq)).sum(-1).mean()), "positions": int(len(f))}


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean next-token NLL of ``ids`` under ``logits`` (positions 0..n−2 predict 1..n−1)."""
    lp = log_softmax(logits[:-1].astype(np.float64))
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def accuracy(folder: str, positions: int) -> dict:
    processor = MiniCPMVProcessor.from_pretrained(folder)
    reference = MiniCPMV.from_pretrained(folder, dtype="float32")
    groups = batches(processor, reference.config.llm.vocab_size, positions)
    ref = {name: logits_of(reference, g) for name, g in groups.items()}
    held_ids = np.asarray(groups["held-out text"][0]["input_ids"][0])
    out = {"float32 perplexity": perplexity(ref["held-out text"], held_ids)}
    del reference
    for mode in MODES:
        model = MiniCPMV.from_pretrained(folder, dtype="float32", quantize=mode)
        got = {name: logits_of(model, g) for name, g in groups.items()}
        out[mode] = {name: compare(ref[name], got[name]) for name in groups}
        out[mode]["perplexity"] = perplexity(got["held-out text"], held_ids)
        del model
    return out


# --------------------------------------------------------------------------- bytes, memory, speed


def llm_bytes(model) -> int:
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model.llm, nnx.Param)):
        value = var.get_value()
        bits = 4 if value.dtype == jnp.int4 else 8 * value.dtype.itemsize
        total += value.size * bits // 8
    return total


# The child's own high-water mark (VmHWM of /proc/self/status): ru_maxrss would carry the parent's peak
# over fork + exec on Linux, and this parent holds several models.
_PEAK = ("print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")


def _child_peak(body: str) -> int:
    code = "import os; os.environ.setdefault('JAX_PLATFORMS', 'cpu'); import jax; " + body + "; " + _PEAK
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def load_peak(folder: str, mode: str | None, generate: bool = False) -> int:
    """Peak RSS (bytes) of a child process that loads ``folder`` as bfloat16, quantized as ``mode`` (and
    then, with ``generate``, answers one prompt with 8 greedy tokens through the compiled loop)."""
    body = ("from minicpmv_jax import MiniCPMV, MiniCPMVProcessor; "
            f"m = MiniCPMV.from_pretrained({folder!r}, dtype='bfloat16', quantize={mode!r}); "
            "jax.block_until_ready(jax.tree.leaves(m))")
    if generate:
        body += (f"; p = MiniCPMVProcessor.from_pretrained({folder!r}); "
                 "m.chat(msgs=[{'role': 'user', 'content': 'Hello there'}], processor=p, sampling=False, "
                 "num_beams=1, max_new_tokens=8, min_new_tokens=8)")
    return _child_peak(body)


def import_peak() -> int:
    return _child_peak("import minicpmv_jax.model; jax.numpy.zeros(1).block_until_ready()")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="layers of the 0.5B-shaped model (default 24)")
    ap.add_argument("--positions", type=int, default=1024, help="random-text positions for accuracy")
    ap.add_argument("--small", action="store_true", help="2 layers, 256 positions: a quick check")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.small:
        args.layers, args.positions = 2, 256
    results: dict = {"device": f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores)", "layers": args.layers}
    print(f"{results['device']}; Qwen2-0.5B shape with {args.layers} layers", flush=True)
    folders = []
    try:
        for name, cfg in (("tiny", tiny()), ("qwen2-0.5b", qwen2_05b(args.layers))):
            folder = write_folder(cfg, "float32")
            folders.append(folder)
            acc = accuracy(folder, args.positions)
            results[f"accuracy {name}"] = acc
            print(f"\naccuracy against float32, {name} (held-out perplexity float32 {acc['float32 perplexity']:.4g}):")
            for mode in MODES:
                for group, m in acc[mode].items():
                    if group == "perplexity":
                        continue
                    print(f"  {mode} {group:<14} rel {m['rel']:.4f}  top-1 {m['top1'] * 100:5.1f} %  "
                          f"KL {m['kl']:.4f}  ({m['positions']} positions)")
                change = acc[mode]["perplexity"] / acc["float32 perplexity"] - 1
                print(f"  {mode} held-out perplexity {acc[mode]['perplexity']:.4g} ({change * 100:+.2f} %)", flush=True)

        cfg = qwen2_05b(args.layers)
        folder = write_folder(cfg, "bfloat16")
        folders.append(folder)
        models = {None: MiniCPMV.from_pretrained(folder, dtype="bfloat16")}
        for mode in MODES:
            models[mode] = MiniCPMV.from_pretrained(folder, dtype="bfloat16", quantize=mode)
        base = llm_bytes(models[None])
        print(f"\nlanguage-model parameter bytes (0.5B shape, {args.layers} layers):")
        results["bytes"] = {}
        for mode, model in models.items():
            b = llm_bytes(model)
            results["bytes"][str(mode or "bfloat16")] = b
            print(f"  {mode or 'bfloat16':<9} {b / 2**20:9.1f} MiB  {b / base:.3f}× bfloat16")
        quant_share = sum(v.get_value().size * 2 for p, v in nnx.to_flat_state(nnx.state(models[None].llm, nnx.Param))
                          if p[0] == "layers" and p[-1] == "kernel")
        print(f"  (the quantized projections are {quant_share / base * 100:.0f} % of the bfloat16 language model; "
              "the embedding and lm_head stay bfloat16)")

        results["load peak"], results["generate peak"] = {}, {}
        floor = import_peak()
        print(f"\npeak host memory of a child process (imports alone {floor / 2**20:.0f} MiB), loading the bfloat16 "
              "folder, then also answering 8 tokens with the compiled loop:")
        for mode in (None,) + MODES:
            peak, gen_peak = load_peak(folder, mode), load_peak(folder, mode, generate=True)
            results["load peak"][str(mode or "bfloat16")] = peak
            results["generate peak"][str(mode or "bfloat16")] = gen_peak
            print(f"  {mode or 'bfloat16':<9} load {(peak - floor) / 2**20:7.0f} MiB above imports;  "
                  f"load + generate {(gen_peak - floor) / 2**20:7.0f} MiB", flush=True)

        print("\ndecode on CPU, compiled loop, ms per token (bfloat16 computation):")
        results["decode ms"] = {}
        models["float32"] = MiniCPMV.from_pretrained(folder, dtype="float32")
        for batch in (1, 8):
            row = {str(mode or "bfloat16"): loop_per_token(model, batch, 64) * 1e3 for mode, model in models.items()}
            results["decode ms"][batch] = row
            bf = row["bfloat16"]
            print(f"  batch {batch}: " + "   ".join(f"{k} {v:7.1f} ms ({bf / v:.2f}× bf16 speed)" for k, v in row.items()),
                  flush=True)
        # The engine's decode step is one program per token, called from Python: nothing for XLA to hoist
        # out of a loop, so the dequantization runs in every step.
        processor = MiniCPMVProcessor.from_pretrained(folder)
        row = {str(mode or "bfloat16"): engine_step_time(model, processor, 1, 1, 256) * 1e3
               for mode, model in models.items()}
        results["engine step ms"] = row
        print("  engine step, 1 slot: " + "   ".join(f"{k} {v:7.1f} ms ({row['bfloat16'] / v:.2f}×)"
                                                    for k, v in row.items()), flush=True)
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
