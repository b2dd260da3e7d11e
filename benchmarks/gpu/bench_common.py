"""What both sides of ``bench.py`` share: the plan, the synthetic inputs, timing and recording."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _p in (ROOT, os.path.join(ROOT, "tests")):  # the package, and the torch vision reference in tests/
    if _p not in sys.path:
        sys.path.insert(0, _p)

GB = 1e9
STOP_IDS = (151645, 151643)      # <|im_end|>, <|endoftext|> of the released tokenizer
PREFILL_EXTRA_SLOTS = 16         # cache slots after the prompt in the prefill measurement


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures; the same for both sides."""

    small: bool
    batches: tuple[int, ...]
    new_tokens: int
    decode_prompt: int
    prefill_tokens: int
    image_size: int
    repeats: int
    max_measure_s: float
    copy_mib: int
    seed: int
    long_lengths: tuple[int, ...] = (4096, 16384)    # JAX only: prefill per attention kernel
    video_frames: int = 64                           # JAX only: TTFT of a video of this many frames
    video_frame: tuple[int, int] = (896, 504)        # (width, height): 16:9, 3 pieces at max_slice_nums=2


def model_config(small: bool):
    from minicpmv_jax.config import minicpmv_2_6, tiny
    return tiny(vocab_size=4099, num_layers=2) if small else minicpmv_2_6()


def stop_ids(vocab_size: int) -> tuple[int, ...]:
    """The released stop ids, or the last two ids of a smaller vocabulary."""
    return STOP_IDS if max(STOP_IDS) < vocab_size else (vocab_size - 1, vocab_size - 2)


def image_prompt(grid, num_queries: int, vocab_size: int, seed: int):
    """Token ids [T] int32 and placeholder spans [n, 2] of a one-image chat prompt (docs/model.md §6 layout).

    ``<|im_start|>user\\n<image_id>0</image_id>`` (5 ids), ``<image>`` + Q placeholders + ``</image>``, then
    per slice row (``\\n`` between rows) cols × (``<slice>`` + Q + ``</slice>``), then a 24-id question and
    ``<|im_end|>\\n<|im_start|>assistant\\n``. Ids are random (placeholders are replaced by features).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    ids: list[int] = []
    bounds = []

    def text(n):
        ids.extend(rng.integers(0, vocab_size, n).tolist())

    def piece():
        text(1)
        bounds.append((len(ids), len(ids) + num_queries))
        text(num_queries)
        text(1)

    text(5)
    piece()
    if grid is not None:
        cols, rows = grid
        for r in range(rows):
            if r:
                text(1)
            for _ in range(cols):
                piece()
    text(24)
    return np.asarray(ids, np.int32), np.asarray(bounds, np.int64)


def video_prompt(grid, num_frames: int, num_queries: int, vocab_size: int, seed: int):
    """Token ids [T] and placeholder spans [n, 2] of a video chat prompt: per frame (``\n`` between frames)
    ``<image>`` + Q + ``</image>`` and its slices as in :func:`image_prompt`, no image ids (the video
    recipe), then a 24-id question and the assistant prefix."""
    import numpy as np

    one_ids, one_bounds = image_prompt(grid, num_queries, vocab_size, seed)
    body = one_ids[5:-24]                                   # one frame's pieces, without prefix and question
    rng = np.random.default_rng(seed)
    ids, bounds = list(rng.integers(0, vocab_size, 3)), []
    for f in range(num_frames):
        if f:
            ids.append(int(rng.integers(0, vocab_size)))
        bounds += [(a - 5 + len(ids), b - 5 + len(ids)) for a, b in one_bounds]
        ids += body.tolist()
    ids += rng.integers(0, vocab_size, 24).tolist()
    return np.asarray(ids, np.int32), np.asarray(bounds, np.int64)


def random_frame(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def random_image(side: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")


def kv_bytes_per_token(llm_cfg, itemsize: int = 2) -> int:
    """K and V of one token over all layers."""
    return 2 * llm_cfg.num_hidden_layers * llm_cfg.num_key_value_heads * llm_cfg.head_dim * itemsize


# --------------------------------------------------------------------------------------------- recording


class Recorder:
    """One side's results, written to ``path`` after every phase; phases run until the deadline passes."""

    def __init__(self, path: str, side: str, deadline_s: float):
        self.path, self.side = path, side
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s
        self.res: dict = {"side": side, "phase_s": {}, "first_call_s": {}, "skipped": [], "errors": {},
                          "peak_after": {}}

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.res, f, indent=1)
        os.replace(tmp, self.path)

    def log(self, msg: str) -> None:
        print(f"[{self.side} {time.monotonic() - self.start:6.1f}s] {msg}", flush=True)

    def phase(self, name: str, fn, peak_fn) -> None:
        if time.monotonic() > self.deadline:
            self.res["skipped"].append(name)
            self.log(f"{name}: skipped (out of time)")
            self.save()
            return
        t = time.monotonic()
        try:
            fn()
        except Exception as e:  # one failed phase must not lose the others (e.g. out of memory at B = 32)
            traceback.print_exc()
            self.res["errors"][name] = f"{type(e).__name__}: {str(e)[:400]}"
        self.res["phase_s"][name] = time.monotonic() - t
        self.res["peak_after"][name] = peak_fn()
        self.log(f"{name}: {self.res['phase_s'][name]:.1f} s")
        self.save()


def measure(fn, plan: Plan) -> dict:
    """``fn`` once as warm-up, then up to ``plan.repeats`` timed calls (fewer past ``max_measure_s``)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times: list[float] = []
    spent = 0.0
    while len(times) < plan.repeats and (not times or spent < plan.max_measure_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        spent += times[-1]
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def measure_pair(one, full, plan: Plan) -> tuple[dict, dict]:
    """t(1) and t(N) with their calls interleaved (drift hits both alike)."""
    t = time.perf_counter()
    one()
    first_one = time.perf_counter() - t
    t = time.perf_counter()
    full()
    first_full = time.perf_counter() - t
    a: list[float] = []
    b: list[float] = []
    spent = 0.0
    while len(a) < plan.repeats and (not a or spent < plan.max_measure_s):
        for fn, sink in ((one, a), (full, b)):
            t = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - t)
            spent += sink[-1]
    pack = lambda first, ts: {"first_s": first, "median_s": statistics.median(ts), "min_s": min(ts),  # noqa: E731
                              "n": len(ts)}
    return pack(first_one, a), pack(first_full, b)


def decode_result(t1: dict, tn: dict, batch: int, n: int) -> dict:
    """Step time from t(1) and t(N); tokens/s is None when noise made the difference ≤ 0 (tiny CPU runs)."""
    step = (tn["median_s"] - t1["median_s"]) / (n - 1)
    return {"t1": t1, "tn": tn, "new_tokens": n, "step_ms": step * 1e3,
            "tok_s": batch / step if step > 0 else None,
            "e2e_tok_s": batch * n / tn["median_s"]}


def host_peak_bytes() -> int:
    """This process's peak resident memory (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_pixels(plan: Plan, cfg):
    """The pieces of one random image (the vision measurement's input)."""
    from minicpmv_jax.image_processing import preprocess_image

    sl = cfg.slicing
    return preprocess_image(random_image(plan.image_size, plan.seed), sl.max_slice_nums, sl.scale_resolution,
                            sl.patch_size).pixel_values


