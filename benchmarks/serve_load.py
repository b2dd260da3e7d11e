"""Serving under load: the continuous-batching engine against ``model.chat`` one by one and in static batches.

At the Qwen2-0.5B shape (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocabulary 151 936; random weights,
float32, the tests' Qwen2 tokenizer) on this machine's CPU, N concurrent clients each send one text
request; prompt lengths and answer lengths are mixed (answers forced to their length with
``min_new_tokens``, since random weights rarely stop on their own). Measured in the same run:

* **engine** — every request submitted at once from N client threads to an :class:`Engine` with
  ``--slots`` decode slots (the server's path, without HTTP);
* **one by one** — the same requests through ``model.chat``, one after the other;
* **static batches** — ``model.chat`` on batches of ``--static-batch`` conversations, in arrival order
  (each batch runs until its longest answer is done: a static batch's cost);

Reported: useful generated tokens/s (each request's own answer length), TTFT and time per output token
(p50 / p99) for the engine, and the two other goals of issue 17: the engine's decode step with all slots
busy against the compiled loop's per-token time at the same batch size, and a lone request's per-token
time in the engine against the compiled loop's at batch 1.

    python benchmarks/serve_load.py                 # 16 clients, 16 slots (a few minutes on 2 cores)
    python benchmarks/serve_load.py --small         # a 2-layer model: a quick check that it all runs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import qwen2_05b  # noqa: E402
from minicpmv_jax import generate as gen  # noqa: E402
from minicpmv_jax.chat import MiniCPMV  # noqa: E402
from minicpmv_jax.engine import Engine, EngineConfig, request_from_messages  # noqa: E402
from minicpmv_jax.engine import slots as S  # noqa: E402
from minicpmv_jax.generation_config import GenerationConfig  # noqa: E402
from minicpmv_jax.processor import MiniCPMVProcessor  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven small cats watch from the old red barn "
         "and count the clouds").split()


def workload(n: int, seed: int = 0) -> list[tuple[list[dict], int]]:
    """n conversations with prompts of 8–160 words and answers of 8–64 tokens (mixed, seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 160))))
        out.append(([{"role": "user", "content": f"Summarise: {words}"}], int(rng.integers(8, 65))))
    return out


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]  # noqa: E731
    return f"p50 {p(0.5) * 1e3:7.1f} ms   p99 {p(0.99) * 1e3:7.1f} ms"


def greedy(n: int) -> dict:
    return dict(sampling=False, num_beams=1, max_new_tokens=n, min_new_tokens=n)


def run_engine(model, processor, work, slots: int, max_len: int):
    engine = Engine(model, processor, EngineConfig(max_batch=slots, max_len=max_len, max_queue=len(work) + 1))
    requests = [request_from_messages(processor, conv, GenerationConfig.for_chat(**greedy(n))) for conv, n in work]
    # warm up: compile prefill buckets, insert and the decode step
    for r in requests:
        engine.submit(dataclasses.replace(r, config=GenerationConfig.for_chat(**greedy(2)), request_id="warm"))
    engine.run_until_idle()
    engine.start()
    ttft, tpot, done = [], [], [None] * len(requests)

    def client(i):
        last, t0 = None, time.perf_counter()
        for piece in engine.submit(requests[i]):
            now = time.perf_counter()
            if last is None:
                ttft.append(now - t0)
            elif piece.token_ids:
                tpot.append(now - last)
            last = now
        done[i] = time.perf_counter()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.stop()
    return wall, ttft, tpot


def run_one_by_one(model, processor, work):
    for conv, n in work:    # warm-up: every prompt and answer bucket compiled before the clock runs
        model.chat(msgs=conv, processor=processor, **greedy(n))
    start = time.perf_counter()
    for conv, n in work:
        model.chat(msgs=conv, processor=processor, **greedy(n))
    return time.perf_counter() - start


def run_static(model, processor, work, batch: int):
    groups = [work[i:i + batch] for i in range(0, len(work), batch)]
    for g in groups:   # warm-up: every batch shape once
        model.chat(msgs=[c for c, _ in g], processor=processor, **greedy(max(n for _, n in g)))
    start = time.perf_counter()
    for g in groups:
        model.chat(msgs=[c for c, _ in g], processor=processor, **greedy(max(n for _, n in g)))
    return time.perf_counter() - start


def loop_per_token(model, batch: int, prompt: int, n: int = 17) -> float:
    """The compiled loop's time per generated token at ``batch`` rows: (t(n new) − t(1 new)) / (n − 1)."""
    ids = jax.random.randint(jax.random.key(1), (batch, prompt), 0, model.config.llm.vocab_size, jnp.int32)
    p = gen.PreparedBatch(ids, jnp.ones((batch, prompt), bool), jnp.ones((batch,), bool), batch_size=batch)

    def timed(k):
        config = GenerationConfig(max_new_tokens=k, min_new_tokens=k)
        jax.block_until_ready(gen.generate(model, p, config, (151645,), num_new=n).tokens)
        ts = []
        for _ in range(3):
            s = time.perf_counter()
            jax.block_until_ready(gen.generate(model, p, config, (151645,), num_new=n).tokens)
            ts.append(time.perf_counter() - s)
        return statistics.median(ts)

    return (timed(n) - timed(1)) / (n - 1)


def engine_step_time(model, processor, slots: int, busy: int, max_len: int, reps: int = 8) -> float:
    """The engine's decode step with ``busy`` of its ``slots`` running, timed alone (median)."""
    engine = Engine(model, processor, EngineConfig(max_batch=slots, max_len=max_len))
    conv = [{"role": "user", "content": "Hello there, how are you today?"}]
    for _ in range(busy):
        engine.submit(request_from_messages(processor, conv, GenerationConfig.for_chat(**greedy(max_len // 2))))
    while engine.stats().running < busy or engine._prefill is not None:
        engine.step()
    release = jnp.zeros((slots,), bool)
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        engine._slots, out = S.decode_step(engine._graphdef, engine._params, engine._slots, release,
                                           context=engine._context)
        np.asarray(out.token)
        ts.append(time.perf_counter() - s)
    return statistics.median(ts[2:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--small", action="store_true", help="2 layers, 4 clients: a quick check")
    args = ap.parse_args(argv)
    if args.small:
        args.layers, args.clients, args.slots, args.static_batch = 2, 4, 4, 2

    from minicpmv_jax.testing.checkpoint import write_checkpoint  # tokenizer files come with the test extra
    from minicpmv_jax.testing.tokenizer_files import write_tokenizer_files

    cfg = qwen2_05b(args.layers)
    folder = tempfile.mkdtemp(prefix="serve_load_")
    write_tokenizer_files(folder)
    processor = MiniCPMVProcessor.from_pretrained(folder)
    model = MiniCPMV(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    del write_checkpoint
    work = workload(args.clients)
    useful = sum(n for _, n in work)
    print(f"{jax.devices()[0].device_kind} ({os.cpu_count()} cores), Qwen2-0.5B shape with {args.layers} layers, "
          f"float32; {args.clients} clients, {useful} answer tokens in all (8–64 each), prompts "
          f"{min(len(processor.tokenizer.encode(c[0]['content'])) for c, _ in work)}–"
          f"{max(len(processor.tokenizer.encode(c[0]['content'])) for c, _ in work)} tokens", flush=True)

    wall_e, ttft, tpot = run_engine(model, processor, work, args.slots, args.max_len)
    wall_1 = run_one_by_one(model, processor, work)
    wall_s = run_static(model, processor, work, args.static_batch)
    tps = lambda wall: useful / wall  # noqa: E731
    print(f"\n{'system':<34}{'wall':>9}{'tokens/s':>10}{'vs one by one':>15}")
    for name, wall in ((f"engine, {args.slots} slots", wall_e), ("model.chat one by one", wall_1),
                       (f"model.chat static batches of {args.static_batch}", wall_s)):
        print(f"{name:<34}{wall:8.1f}s{tps(wall):10.1f}{wall_1 / wall:14.2f}×")
    print(f"engine / static batches: {wall_s / wall_e:.2f}×   (goals: ≥ 4× one by one, ≥ 1.3× static batches)")
    print(f"engine TTFT                 {percentiles(ttft)}")
    print(f"engine time per output token {percentiles(tpot)}")

    # What any scheduler could reach on this machine: the prompts' prefill (the same requests, answers cut
    # to one token) plus every answer token at the full-batch step's cost per row. Prefill is compute-bound
    # here, so batching prompts does not shrink it; the decode step is too, so a row costs step/slots.
    wall_p, _, _ = run_engine(model, processor, [(c, 1) for c, _ in work], args.slots, args.max_len)
    step_full = engine_step_time(model, processor, args.slots, args.slots, args.max_len)
    floor = wall_p + (useful - len(work)) / args.slots * step_full
    print(f"ceiling: the prompts alone take {wall_p:.1f} s (answers of 1 token); the other {useful - len(work)} "
          f"tokens at {args.slots} per {step_full * 1e3:.0f} ms step take ≥ "
          f"{(useful - len(work)) / args.slots * step_full:.1f} s → engine ≥ {floor:.1f} s, at most "
          f"{wall_1 / floor:.2f}× one by one on this machine (measured {wall_1 / wall_e:.2f}×)")

    b = args.static_batch
    step_busy = engine_step_time(model, processor, b, b, args.max_len)
    loop_b = loop_per_token(model, b, 64)
    print(f"\ndecode step, {b} slots all busy: {step_busy * 1e3:.1f} ms; compiled loop at batch {b}: "
          f"{loop_b * 1e3:.1f} ms per token → {step_busy / loop_b:.2f}× (goal ≤ 1.2×)")
    loop_1 = loop_per_token(model, 1, 64)
    lone_full = engine_step_time(model, processor, args.slots, 1, args.max_len)
    lone_one = engine_step_time(model, processor, 1, 1, args.max_len)
    print(f"lone request: engine step {lone_one * 1e3:.1f} ms with 1 slot, {lone_full * 1e3:.1f} ms with "
          f"{args.slots} slots; compiled loop at batch 1: {loop_1 * 1e3:.1f} ms per token → "
          f"{lone_one / loop_1:.2f}× / {lone_full / loop_1:.2f}× (goal ≤ 1.2×)")


if __name__ == "__main__":
    sys.exit(main())
