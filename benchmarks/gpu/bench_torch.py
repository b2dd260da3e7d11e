"""The PyTorch side of ``bench.py``: transformers' Qwen2 (sdpa, eager) + the torch SigLIP/resampler reference."""

from __future__ import annotations

import dataclasses
import statistics
import time

from bench_common import (GB, Plan, Recorder, decode_result, host_peak_bytes, image_prompt, measure, measure_pair,
                          model_config, proc_pixels, random_image, stop_ids)


def build_torch(cfg, device: str, dtype, seed: int):
    """transformers Qwen2 (sdpa) + the torch vision reference, random weights, on ``device`` in ``dtype``.

    Every module is built directly on the device in ``dtype`` — no float32 or host copy ever exists, so the
    peak memory is the model's and nothing slow runs on the host — with its own initialisation:
    transformers' for Qwen2 (normal(0, 0.02), norms 1, biases 0), PyTorch's defaults for the vision
    reference, whose zero-initialised resampler query and projection are drawn at random.
    """
    import torch
    import transformers

    import torch_vision_reference as ref

    c = cfg.llm
    hc = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="sdpa")
    torch.manual_seed(seed)
    v, r = cfg.vision, cfg.resampler
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = transformers.Qwen2ForCausalLM(hc).eval()
            vpm = ref.TorchSiglip(v.hidden_size, v.intermediate_size, v.num_attention_heads,
                                  cfg.num_vision_layers, patch_size=v.patch_size, side=v.num_patches_per_side,
                                  eps=v.layer_norm_eps).eval()
            resampler = ref.TorchResampler(r.num_queries, r.embed_dim, r.kv_dim, head_dim=r.head_dim,
                                           eps=r.layer_norm_eps).eval()
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        resampler.query.normal_()
        resampler.proj.normal_(0.0, r.embed_dim ** -0.5)
    # The reference computes its position ids and sin-cos table on the host (it was written for CPU tests);
    # move them to the model's device. Module globals, so only this benchmark process sees the change.
    for name in ("torch_bucket_coords", "sincos_2d_table"):
        host = getattr(ref, name)
        setattr(ref, name, lambda *a, _host=host: _host(*a).to(device))
    return llm, vpm, resampler


def run_torch(plan: Plan, rec: Recorder) -> None:
    import numpy as np
    import torch
    import transformers

    from minicpmv_jax.image_processing import preprocess_image

    cuda = torch.cuda.is_available() and not plan.small
    if not plan.small and not cuda:
        raise SystemExit("the full-size benchmark needs a GPU (torch sees no CUDA device); use --small")
    device = "cuda" if cuda else "cpu"
    if plan.small:
        torch.set_num_threads(1)
    dtype = torch.bfloat16
    cfg = model_config(plan.small)
    res = rec.res
    res.update(device=torch.cuda.get_device_name() if cuda else "cpu", platform=device,
               torch=torch.__version__, transformers=transformers.__version__)
    if cuda:
        res["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def peak():
        if cuda:
            res["peak_mem_kind"] = "torch.cuda.max_memory_allocated"
            res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            return torch.cuda.max_memory_allocated()
        res["peak_mem_kind"] = "host peak RSS"
        return host_peak_bytes()

    state = {}
    stops = list(stop_ids(cfg.llm.vocab_size))
    n = plan.new_tokens
    sl = cfg.slicing
    q = cfg.vision.patch_size

    def gen_config(k, **extra):
        return transformers.GenerationConfig(
            max_new_tokens=k, min_new_tokens=k, do_sample=False, num_beams=1, eos_token_id=stops,
            pad_token_id=stops[0], top_k=None, top_p=None, temperature=None, **extra)

    def features(pixels):
        """Host pixels → [pieces, Q, D] on the device: per piece TorchSiglip → TorchResampler."""
        vpm, resampler = state["vpm"], state["resampler"]
        with torch.no_grad():
            out = [resampler(vpm(torch.from_numpy(px).to(device=device, dtype=dtype)), px.shape[1] // q,
                             px.shape[2] // q) for px in pixels]
        return torch.stack(out)

    def copy_bandwidth():
        src = torch.ones(plan.copy_mib * 2 ** 20 // 2, dtype=dtype, device=device)
        dst = torch.empty_like(src)
        m = measure(lambda: (dst.copy_(src), sync()), dataclasses.replace(plan, repeats=5))
        return 2 * src.numel() * src.element_size() / m["median_s"] / GB

    def setup():
        res["copy_bw_GBs"] = copy_bandwidth()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()     # the peak is the model's, not the copy test's
        t = time.perf_counter()
        state["llm"], state["vpm"], state["resampler"] = build_torch(cfg, device, dtype, plan.seed)
        sync()
        res["init_s"] = time.perf_counter() - t
        res["attn_implementation"] = state["llm"].config._attn_implementation

    def ttft():
        llm = state["llm"]
        grid = preprocess_image(random_image(plan.image_size, plan.seed), sl.max_slice_nums,
                                sl.scale_resolution, sl.patch_size).grid
        ids, bounds = image_prompt(grid, cfg.resampler.num_queries, cfg.llm.vocab_size, plan.seed)
        ids_t = torch.from_numpy(ids.astype(np.int64))[None].to(device)
        mask = torch.ones_like(ids_t)
        counter = iter(range(1, 10 ** 6))
        stages = []

        def embeds(pixels):
            feats = features(pixels)
            with torch.no_grad():
                x = llm.model.embed_tokens(ids_t).clone()
                for (start, end), f in zip(bounds.tolist(), feats):
                    x[0, start:end] = f.to(x.dtype)
            return x

        def once():
            img = random_image(plan.image_size, plan.seed + next(counter))
            t0 = time.perf_counter()
            proc = preprocess_image(img, sl.max_slice_nums, sl.scale_resolution, sl.patch_size)
            t1 = time.perf_counter()
            x = embeds(proc.pixel_values)
            sync()
            t2 = time.perf_counter()
            with torch.no_grad():
                out = llm.generate(inputs_embeds=x, attention_mask=mask, generation_config=gen_config(1))
            int(out[0, -1].item())
            stages.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
            state["embeds"] = x

        m = measure(once, plan)
        rec.res["first_call_s"]["ttft"] = m["first_s"]
        timed = stages[1:]
        res["ttft"] = {**m, "prompt_tokens": len(ids), "padded_tokens": len(ids), "pieces": len(bounds),
                       **{k: statistics.median(s[i] for s in timed) * 1e3
                          for i, k in enumerate(("preprocess_ms", "vision_ms", "prefill_first_ms"))}}
        state["mask"] = mask

    def vision():
        pixels = proc_pixels(plan, cfg)
        m = measure(lambda: (features(pixels), sync()), plan)
        res["vision"] = {**m, "pieces": len(pixels), "batch": 1, "patches": int(pixels[0][0].size // q // q),
                         "pieces_s": len(pixels) / m["median_s"]}

    def decode(b):
        llm = state["llm"]
        if b == 1 and "embeds" in state:          # after the image prompt of the TTFT
            kwargs = {"inputs_embeds": state["embeds"], "attention_mask": state["mask"]}
            context, prompt_out, prompt = state["embeds"].shape[1], 0, "image"   # only new tokens come out
        else:                                     # random text (also batch 1 when the TTFT phase failed)
            gen_ = torch.Generator(device="cpu").manual_seed(plan.seed + b)
            ids = torch.randint(0, cfg.llm.vocab_size, (b, plan.decode_prompt), generator=gen_).to(device)
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            context, prompt_out, prompt = plan.decode_prompt, plan.decode_prompt, "text"
        configs = {k: gen_config(k) for k in (1, n)}

        def run(k):
            with torch.no_grad():
                out = llm.generate(**kwargs, generation_config=configs[k])
            sync()
            if tuple(out.shape) != (b, prompt_out + k):
                raise RuntimeError(f"batch {b}: generate returned shape {tuple(out.shape)}, expected "
                                   f"{(b, prompt_out + k)} (a row stopped early?)")

        t1, tn = measure_pair(lambda: run(1), lambda: run(n), plan)
        rec.res["first_call_s"][f"decode_b{b}"] = t1["first_s"]
        res[f"decode_b{b}"] = {**decode_result(t1, tn, b, n), "context": context, "prompt": prompt,
                               "cache_slots": context + n}
        if "cache" not in res:
            with torch.no_grad():
                out = llm.generate(**kwargs, generation_config=gen_config(1, return_dict_in_generate=True))
            cache = next((out[k] for k in ("cache", "past_key_values") if k in out), None)
            res["cache"] = type(cache).__name__
        if cuda:
            torch.cuda.empty_cache()

    def prefill():
        llm = state["llm"]
        gen_ = torch.Generator(device="cpu").manual_seed(plan.seed)
        ids = torch.randint(0, cfg.llm.vocab_size, (1, plan.prefill_tokens), generator=gen_).to(device)

        def once():
            with torch.no_grad():
                llm(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync()

        m = measure(once, plan)
        rec.res["first_call_s"]["prefill"] = m["first_s"]
        res["prefill"] = {**m, "tokens": plan.prefill_tokens, "tok_s": plan.prefill_tokens / m["median_s"]}

    rec.phase("setup", setup, peak)
    if "llm" not in state:
        return
    rec.phase("ttft", ttft, peak)
    rec.phase("vision", vision, peak)
    if 1 in plan.batches:
        rec.phase("decode_b1", lambda: decode(1), peak)
    rec.phase("prefill", prefill, peak)
    for b in plan.batches:
        if b != 1:
            rec.phase(f"decode_b{b}", lambda b=b: decode(b), peak)
    res["peak_mem_bytes"] = peak()


