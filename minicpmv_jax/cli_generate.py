"""The ``chat`` and ``generate`` subcommands of ``minicpmv-jax`` (see :mod:`minicpmv_jax.cli`).

    minicpmv-jax chat --model PATH_OR_HUB_ID [--image F ...] [--video F] [--system T]
                      [--greedy | --beams N] [--temperature/--top-p/--top-k/--repetition-penalty]
                      [--max-new-tokens N] [--seed S] [--stream] PROMPT
    minicpmv-jax generate --model … --input requests.jsonl --output answers.jsonl [--batch-size B] …

``generate`` reads one JSON object per line — ``{"id": …, "prompt": "…", "images": ["a.jpg", …],
"video": "clip.mp4", "system": "…"}`` (only ``prompt`` is required) — and writes one line per request,
in order: ``{"id": …, "answer": "…"}``, or ``{"id": …, "error": "…"}`` for a request that cannot be
served (bad JSON, a missing image, …) without stopping the others. ``--model demo`` runs a tiny
random-weight model (answers are noise) so the pipeline can be tried offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from tqdm import tqdm

__all__ = ["add_chat_parser", "add_generate_parser"]

# Card example for video (DESIGN §6): frames as images, no image ids, at most 2 slices per frame.
VIDEO_MAX_SLICE_NUMS = 2


# ---------------------------------------------------------------------------------------- arguments


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (HF or converted), a Hugging Face Hub id, "
                   "or 'demo' (tiny random weights, offline)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--system", default="", help="system prompt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    mode.add_argument("--beams", type=int, metavar="N", help="beam search with N beams (the reference's "
                      "sampling=False mode uses 3)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-slice-nums", type=int, help="override the checkpoint's max_slice_nums")
    p.add_argument("--max-frames", type=int, default=64, help="most video frames sampled (default 64)")


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="answer one prompt about images or a video")
    _add_common(p)
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    p.add_argument("--video", metavar="FILE", help="a video file (frames sampled at 1 fps)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=_chat)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer a JSONL file of requests in batches")
    _add_common(p)
    p.add_argument("--input", required=True, metavar="JSONL")
    p.add_argument("--output", required=True, metavar="JSONL")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_generate)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.greedy:
        kw.update(sampling=False, num_beams=1)
    elif args.beams is not None:
        kw.update(sampling=False, num_beams=args.beams)
    else:
        kw["sampling"] = True
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "min_new_tokens"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if not kw["sampling"]:  # sampling-only flags would only warn
        for name in ("temperature", "top_p", "top_k"):
            if name in kw:
                raise ValueError(f"--{name.replace('_', '-')} only applies when sampling (drop --greedy/--beams)")
    return kw


def model_folder(model: str) -> str:
    """``--model``'s local folder (a Hub id downloaded and converted, ``demo`` built), with the demo's
    notice on stderr."""
    from minicpmv_jax.demo import DEMO_NAME, DEMO_NOTICE
    from minicpmv_jax.hub import resolve_model

    if model == DEMO_NAME:
        print(DEMO_NOTICE, file=sys.stderr)
    return resolve_model(model)


def _load(args: argparse.Namespace):
    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor

    folder = model_folder(args.model)
    return MiniCPMV.from_pretrained(folder, dtype=args.dtype), MiniCPMVProcessor.from_pretrained(folder)


def _request_content(prompt: str, images: list[str], video: str | None, max_frames: int
                     ) -> tuple[list[Any], dict[str, Any]]:
    """The user message's content (images / video frames first, then the prompt) and per-request options."""
    from minicpmv_jax.image_processing import load_image
    from minicpmv_jax.video import load_video

    content: list[Any] = [load_image(path) for path in images]
    options: dict[str, Any] = {}
    if video is not None:
        content += load_video(video, max_frames=max_frames)
        options = {"use_image_id": False, "max_slice_nums": VIDEO_MAX_SLICE_NUMS}
    return content + [prompt], options


# ---------------------------------------------------------------------------------------- chat


def _chat(args: argparse.Namespace) -> int:
    kw = _generation_kwargs(args)
    content, options = _request_content(args.prompt, args.image, args.video, args.max_frames)
    if args.max_slice_nums is not None:
        options["max_slice_nums"] = args.max_slice_nums
    model, processor = _load(args)
    msgs = [{"role": "user", "content": content}]
    result = model.chat(msgs=msgs, processor=processor, stream=args.stream, system_prompt=args.system,
                        **options, **kw)
    if args.stream:
        for piece in result:
            print(piece, end="", flush=True)
        print()
    else:
        print(result)
    return 0


# ---------------------------------------------------------------------------------------- generate


def _parse_request(line: str, number: int) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {number}: not valid JSON ({e})") from None
    if not isinstance(req, dict):
        raise ValueError(f"line {number}: expected a JSON object, got {type(req).__name__}")
    if not isinstance(req.get("prompt"), str):
        raise ValueError(f"line {number}: 'prompt' must be a string")
    images = req.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ValueError(f"line {number}: 'images' must be a list of file paths")
    if req.get("video") is not None and not isinstance(req["video"], str):
        raise ValueError(f"line {number}: 'video' must be a file path")
    if not isinstance(req.get("system", ""), str):
        raise ValueError(f"line {number}: 'system' must be a string")
    return req


def _generate(args: argparse.Namespace) -> int:
    kw = _generation_kwargs(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    with open(args.input, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    model, processor = _load(args)
    results: list[dict[str, Any]] = []
    with tqdm(total=len(lines), desc="generate", unit="req", file=sys.stderr) as bar:
        for start in range(0, len(lines), args.batch_size):
            results += _serve_chunk(model, processor, lines[start:start + args.batch_size], args, kw)
            bar.update(len(lines[start:start + args.batch_size]))
    out_dir = os.path.dirname(os.path.abspath(args.output))
    fd, tmp = tempfile.mkstemp(prefix=".answers-", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    failed = sum("error" in r for r in results)
    print(f"generate: {len(results) - failed} answered, {failed} failed -> {args.output}", file=sys.stderr)
    return 0


def _serve_chunk(model, processor, lines, args, kw) -> list[dict[str, Any]]:
    """Answers one chunk of requests; requests sharing options go in one batched ``chat`` call."""
    out: list[dict[str, Any] | None] = [None] * len(lines)
    groups: dict[tuple, list[tuple[int, Any, list]]] = {}
    for i, (number, line) in enumerate(lines):
        rid = number
        try:
            req = _parse_request(line, number)
            rid = req.get("id", number)
            content, options = _request_content(req["prompt"], req.get("images", []), req.get("video"),
                                                args.max_frames)
            if args.max_slice_nums is not None:
                options["max_slice_nums"] = args.max_slice_nums
            key = (req.get("system", args.system), tuple(sorted(options.items())))
            groups.setdefault(key, []).append((i, rid, [{"role": "user", "content": content}]))
        except (ValueError, OSError) as e:
            out[i] = {"id": rid, "error": str(e)}
    for (system, options), items in groups.items():
        try:
            answers = model.chat(msgs=[conv for _, _, conv in items], processor=processor, system_prompt=system,
                                 **dict(options), **kw)
        except (ValueError, TypeError, OSError):
            answers = None
        for k, (i, rid, conv) in enumerate(items):
            if answers is not None:
                out[i] = {"id": rid, "answer": answers[k]}
                continue
            try:  # the batch failed: serve alone to find which request is at fault
                out[i] = {"id": rid, "answer": model.chat(msgs=conv, processor=processor, system_prompt=system,
                                                          **dict(options), **kw)}
            except (ValueError, TypeError, OSError) as e:
                out[i] = {"id": rid, "error": str(e)}
    return out  # type: ignore[return-value]
