"""The ``chat`` and ``generate`` subcommands of ``minicpmv-jax`` (see :mod:`minicpmv_jax.cli`).

    minicpmv-jax chat --model PATH_OR_HUB_ID [--image F ...] [--video F] [--system T]
                      [--greedy | --beams N] [--temperature/--top-p/--top-k/--repetition-penalty]
                      [--max-new-tokens N] [--seed S] [--stream] PROMPT
    minicpmv-jax generate --model … --input requests.jsonl --output answers.jsonl [--batch-size B]
                          [--overwrite] …

``generate`` reads one JSON object per line — ``{"id": …, "prompt": "…", "images": ["a.jpg", …],
"video": "clip.mp4", "system": "…"}`` (only ``prompt`` is required; image and video paths are relative
to the JSONL file's folder) — and writes one line per request, in order: ``{"id": …, "answer": "…"}``,
or ``{"id": …, "error": "…"}`` for a request that cannot be served (bad JSON, a missing image, …)
without stopping the others. The output is written whole or not at all (a temporary file renamed into
place); its folder is created if needed; an existing output is refused without ``--overwrite``. The exit
status is 1 when every request failed. ``--model demo`` runs a tiny random-weight model (answers are
noise) so the pipeline can be tried offline.

Every setting is checked before the model is loaded, and errors name the flag (``--max-new-tokens``),
never the Python argument behind it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm import tqdm

from minicpmv_jax.attention import IMPLEMENTATIONS
from minicpmv_jax.demo import DEMO_NAME, DEMO_NOTICE
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generation_config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from minicpmv_jax.hf_checkpoint import is_hub_id
from minicpmv_jax.hub import converted_cache_dir, download, resolve_model
from minicpmv_jax.image_processing import DEFAULT_MAX_PIXELS
from minicpmv_jax.checkpoint_files import is_converted

__all__ = ["add_chat_parser", "add_generate_parser", "model_folder"]

# Above this many pixels an image is loaded with a warning (PIL's own warning threshold; it refuses at 2×,
# which is --max-image-pixels' default).
LARGE_IMAGE_PIXELS = DEFAULT_MAX_PIXELS // 2
# The help text of the chat and generate subcommands: plain text, as argparse prints it.
CHAT_HELP = "answer one prompt about images or a video"
GENERATE_HELP = "answer a JSONL file of requests in batches"


# ---------------------------------------------------------------------------------------- arguments


def path_arg(text: str) -> str:
    """An argparse ``type`` for paths: ``~`` expanded (the shell does not expand it in ``--flag=~/x``)."""
    return os.path.expanduser(text)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (HF or converted), a Hugging Face Hub id, "
                   "or 'demo' (tiny random weights, offline)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the language model's projections (int8: per output channel; int4: groups of 128), applied while loading; a folder converted with --quantize loads as written")
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                   help="the language model's attention kernel (default auto: blockwise prefill on CPU, cuDNN "
                   "on GPU, splash on TPU)")
    p.add_argument("--system", default="", help="system prompt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    mode.add_argument("--beams", type=int, metavar="N", dest="num_beams",
                      help="beam search with N beams (the reference's beam search uses 3)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--min-new-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-slice-nums", type=int, help="override the checkpoint's max_slice_nums")
    p.add_argument("--max-frames", type=int, default=64, help="most video frames sampled (default 64)")
    p.add_argument("--max-image-pixels", type=int, dest="max_pixels", metavar="N",
                   help=f"refuse images with more pixels than N, as possible decompression bombs (default "
                   f"{DEFAULT_MAX_PIXELS:,}; images above {LARGE_IMAGE_PIXELS:,} load with a warning unless "
                   "this is given)")


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help=CHAT_HELP, description=CHAT_HELP[0].upper() + CHAT_HELP[1:] + ".")
    _add_common(p)
    p.add_argument("--image", action="append", default=[], metavar="FILE", type=path_arg,
                   help="an image (repeatable)")
    p.add_argument("--video", metavar="FILE", type=path_arg, help="a video file (frames sampled at 1 fps)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(func=_chat)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help=GENERATE_HELP, description=(
        "Answer a JSONL file of requests in batches. Each line is {\"id\": ..., \"prompt\": \"...\", \"images\": "
        "[\"a.jpg\"], \"video\": \"v.mp4\", \"system\": \"...\"} (only prompt is required; paths are relative to "
        "the JSONL file's folder); each output line is {\"id\": ..., \"answer\": \"...\"} or {\"id\": ..., "
        "\"error\": \"...\"}, in order. Exit status 1 when every request failed."))
    _add_common(p)
    p.add_argument("--input", required=True, metavar="JSONL", type=path_arg)
    p.add_argument("--output", required=True, metavar="JSONL", type=path_arg,
                   help="the answers (its folder is created if needed; written whole or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_generate)


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``chat``'s generation keywords from the flags, checked (before any model is loaded)."""
    kw: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.greedy:
        kw.update(sampling=False, num_beams=1)
    elif args.num_beams is not None:
        kw.update(sampling=False, num_beams=args.num_beams)
    else:
        kw["sampling"] = True
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "min_new_tokens"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if not kw["sampling"]:  # sampling-only flags would only warn
        for name in ("temperature", "top_p", "top_k"):
            if name in kw:
                raise ArgumentError("{} only applies when sampling (drop {} / {})", name, "greedy=True",
                                    "num_beams")
    config = GenerationConfig.for_chat(**kw)  # ArgumentError naming the setting
    if getattr(args, "stream", False) and config.strategy == "beam":
        raise ArgumentError("{} needs sampling or greedy decoding (beam search only knows its answer at the end)",
                            "stream=True")
    for name, value in (("max_slice_nums", args.max_slice_nums), ("max_frames", args.max_frames),
                        ("max_pixels", args.max_pixels), ("batch_size", getattr(args, "batch_size", 1))):
        if value is not None and value < 1:
            raise ArgumentError("{} must be ≥ 1, got {value}", name, value=value)
    return kw


def model_folder(model: str) -> str:
    """``--model``'s local folder, with the demo's notice on stderr: a folder, ``demo`` (built once), or a
    Hub id, downloaded and converted once to the Orbax format into
    :func:`~minicpmv_jax.hub.converted_cache_dir` (later runs load that folder directly)."""
    if model == DEMO_NAME:
        print(DEMO_NOTICE, file=sys.stderr)
    if is_hub_id(model) and not os.path.isdir(os.path.expanduser(model)):
        cached = converted_cache_dir(model)
        if not is_converted(cached):
            from minicpmv_jax.convert_weights import convert  # imports Orbax's writer: only when converting

            source = download(model)  # CheckpointError naming the id when it cannot be had
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            convert(source, cached)
        return cached
    return resolve_model(model)


def _load(args: argparse.Namespace):
    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor

    folder = model_folder(args.model)
    return (MiniCPMV.from_pretrained(folder, dtype=args.dtype, attention=args.attention, quantize=args.quantize),
            MiniCPMVProcessor.from_pretrained(folder))


def _warn(args: argparse.Namespace, message: str) -> None:
    tqdm.write(f"minicpmv-jax {args.command}: warning: {message}", file=sys.stderr)  # beside a progress bar


@contextlib.contextmanager
def _pil_guard_is_ours() -> Iterator[None]:
    """PIL's process-wide decompression-bomb guard off while a command runs: ``--max-image-pixels`` is
    the one limit (checked from the header, before decoding, as PIL would), so PIL neither refuses below
    it nor prints its own two-line warning."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _load_image(path: str, args: argparse.Namespace):
    from minicpmv_jax.image_processing import load_image

    image = load_image(path, max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels)
    pixels = image.size[0] * image.size[1]
    if args.max_pixels is None and pixels > LARGE_IMAGE_PIXELS:
        _warn(args, f"image {path!r} is {image.size[0]}x{image.size[1]} = {pixels:,} pixels, a possible "
                    f"decompression bomb; loaded (refused above --max-image-pixels, {DEFAULT_MAX_PIXELS:,} "
                    "by default)")
    return image


def _request_content(prompt: str, images: list[str], video: str | None, args: argparse.Namespace
                     ) -> tuple[list[Any], dict[str, Any]]:
    """The user message's content (images / video frames first, then the prompt) and per-request options."""
    from minicpmv_jax.video import VIDEO_OPTIONS, load_video

    content: list[Any] = [_load_image(path, args) for path in images]
    options: dict[str, Any] = {}
    if video is not None:
        content += load_video(video, max_frames=args.max_frames)
        options = dict(VIDEO_OPTIONS)
    if args.max_slice_nums is not None:
        options["max_slice_nums"] = args.max_slice_nums
    return content + [prompt], options


# ---------------------------------------------------------------------------------------- chat


def _chat(args: argparse.Namespace) -> int:
    kw = _generation_kwargs(args)
    if not args.prompt.strip() and not args.image and args.video is None:
        raise ValueError("the prompt is empty and there is no --image or --video: nothing to answer")
    with _pil_guard_is_ours():
        content, options = _request_content(args.prompt, args.image, args.video, args)
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


def _parse_request(line: str, number: int, base: str) -> dict[str, Any]:
    """One JSONL line → a request, its image and video paths made relative to ``base``."""
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
    if not req["prompt"].strip() and not images and req.get("video") is None:
        raise ValueError(f"line {number}: 'prompt' is empty and there are no 'images' or 'video': nothing to "
                         "answer")
    req["images"] = [os.path.join(base, os.path.expanduser(i)) for i in images]
    if req.get("video") is not None:
        req["video"] = os.path.join(base, os.path.expanduser(req["video"]))
    return req


def _check_output(args: argparse.Namespace) -> list[str]:
    """Refuses, before any work, an ``--output`` that must not be written; creates its missing folders
    and returns them (outermost first), to be removed again if the command fails."""
    out = os.path.abspath(args.output)
    if os.path.isdir(out):
        raise ArgumentError("{} {path} is a folder; name the answers file", "output", path=args.output)
    if os.path.exists(out):
        if os.path.samefile(out, args.input):
            raise ArgumentError("{} {path} is the {} file", "output", "input", path=args.output)
        if not args.overwrite:
            raise ArgumentError("{} {path} already exists; pass {} to replace it", "output", "overwrite=True",
                                path=args.output)
    created: list[str] = []
    folder = os.path.dirname(out)
    while not os.path.isdir(folder):
        if os.path.exists(folder):
            raise ArgumentError("{} {path}: {folder} is not a folder", "output", path=args.output, folder=folder)
        created.insert(0, folder)
        folder = os.path.dirname(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError("{} {path}: cannot write in {folder}", "output", path=args.output, folder=folder)
    for d in created:
        os.mkdir(d)
    return created


def _write_atomically(path: str, records: list[dict[str, Any]]) -> None:
    """``path`` holds ``records`` as JSONL, or (on any failure) stays as it was."""
    fd, tmp = tempfile.mkstemp(prefix=".answers-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _generate(args: argparse.Namespace) -> int:
    kw = _generation_kwargs(args)
    try:
        with open(args.input, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.input}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not lines:
        raise ValueError(f"{args.input}: no requests (the file is empty)")
    created = _check_output(args)
    try:
        model, processor = _load(args)
        base = os.path.dirname(os.path.abspath(args.input))
        results: list[dict[str, Any]] = []
        with tqdm(total=len(lines), desc="generate", unit="req", file=sys.stderr) as bar, _pil_guard_is_ours():
            for start in range(0, len(lines), args.batch_size):
                chunk = lines[start:start + args.batch_size]
                results += _serve_chunk(model, processor, chunk, base, args, kw)
                bar.update(len(chunk))
        _write_atomically(args.output, results)
    except BaseException:
        for d in reversed(created):  # the folders this run made, if still empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    failed = [r for r in results if "error" in r]
    if len(failed) == len(results):
        print(f"minicpmv-jax generate: error: all {len(results)} requests failed (see their \"error\" in "
              f"{args.output})", file=sys.stderr)
        return 1
    print(f"generate: {len(results) - len(failed)} answered, {len(failed)} failed -> {args.output}",
          file=sys.stderr)
    return 0


def _serve_chunk(model, processor, lines, base: str, args, kw) -> list[dict[str, Any]]:
    """Answers one chunk of requests; requests sharing options go in one batched ``chat`` call."""
    message: Callable[[Exception], str] = args.error_message
    out: list[dict[str, Any] | None] = [None] * len(lines)
    groups: dict[tuple, list[tuple[int, Any, list]]] = {}
    for i, (number, line) in enumerate(lines):
        rid = number
        try:
            req = _parse_request(line, number, base)
            rid = req.get("id", number)
            content, options = _request_content(req["prompt"], req["images"], req.get("video"), args)
            key = (req.get("system", args.system), tuple(sorted(options.items())))
            groups.setdefault(key, []).append((i, rid, [{"role": "user", "content": content}]))
        except (ValueError, OSError) as e:
            out[i] = {"id": rid, "error": message(e)}
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
                out[i] = {"id": rid, "error": message(e)}
    return out  # type: ignore[return-value]
