"""The ``minicpmv-jax`` command line.

Subcommands available in this build:

    minicpmv-jax info --model PATH     check a checkpoint folder against its config and summarise it
    minicpmv-jax convert SRC DST       convert an HF safetensors checkpoint to a folder with Orbax parameters
    minicpmv-jax chat --model M PROMPT answer a prompt about images (--image) or a video (--video)
    minicpmv-jax generate --model M --input requests.jsonl --output answers.jsonl   batched answers
    minicpmv-jax plan --mesh DxFxT [--model M] [--batch B --max-len L]   per-device memory on a mesh
        [--compile --prompt-len T [--json]]                            ... and XLA's, compiled here
    minicpmv-jax finetune --model M --data train.json --output DIR [--lora-rank R | --full] [--steps N] ...
                                       LoRA or full fine-tuning, resumable; exports DIR/model
    minicpmv-jax serve --model M [--host H --port P] [--max-batch N --max-len L] [--api-key K] ...
                                       an OpenAI-compatible HTTP server (continuous batching)

``--model`` takes a checkpoint folder, a Hugging Face Hub id (downloaded and converted once), or ``demo``
(a tiny random-weight model for trying the pipeline offline; its answers are noise).

Errors in the user's input (a bad folder, config or tensor) are reported in one line naming the file,
key or tensor, with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import sys
import warnings
from typing import Callable, Mapping

from minicpmv_jax import sharding

from . import orbax_checkpoint
from . import checkpoint_names as names
from .cli_finetune import add_finetune_parser
from .attention import IMPLEMENTATIONS
from .cli_generate import add_chat_parser, add_generate_parser, path_arg
from .cli_serve import add_serve_parser
from .compiled_plan import compiled_memory, format_compiled
from .config import ConfigError, MiniCPMVConfig, num_parameters
from .errors import ArgumentError
from .hf_checkpoint import CheckpointError
from .version import __version__
from .model import abstract_model


DESCRIPTION = ("MiniCPM-V 2.6 in JAX: check, convert, chat with, fine-tune and serve checkpoints. --model takes a "
               "checkpoint folder, a Hugging Face Hub id, or 'demo' (tiny random weights, offline).")


def _info(args: argparse.Namespace) -> int:
    cfg = MiniCPMVConfig.from_pretrained(args.model)
    if orbax_checkpoint.is_converted(args.model):
        quantization = orbax_checkpoint.stored_quantization(args.model)
        abstract = abstract_model(cfg, quantize=quantization)
        stored = orbax_checkpoint.check_params(args.model, abstract)
        dtypes = collections.Counter(str(dtype) for _, dtype in stored.values())
        scheme = f", language model quantized {quantization.mode}" if quantization else ""
        print(f"checkpoint   {args.model}: converted (Orbax){scheme}, {len(stored)} arrays, dtypes {dict(dtypes)}: OK")
    else:
        ckpt = names.open_validated(args.model, cfg)
        dtypes = collections.Counter(i.dtype for i in ckpt.tensors.values())
        files = {i.file for i in ckpt.tensors.values()}
        print(f"checkpoint   {args.model}: {len(ckpt.tensors)} tensors in {len(files)} file(s), "
              f"dtypes {dict(dtypes)}: OK")
    l, v = cfg.llm, cfg.vision
    print(f"parameters   {num_parameters(cfg) / 1e9:.3f} B")
    print(f"llm          Qwen2: {l.num_hidden_layers} layers, width {l.hidden_size}, "
          f"{l.num_attention_heads} heads / {l.num_key_value_heads} KV heads of {l.head_dim}, "
          f"MLP {l.intermediate_size}, vocab {l.vocab_size}, rope θ {l.rope_theta:g}")
    print(f"vision       SigLIP: {cfg.num_vision_layers} of {v.num_hidden_layers} layers run, width "
          f"{v.hidden_size}, {v.num_attention_heads} heads, patch {v.patch_size}, "
          f"{v.num_patches_per_side}×{v.num_patches_per_side} positions")
    print(f"resampler    {cfg.resampler.num_queries} queries, {cfg.resampler.num_heads} heads")
    print(f"slicing      up to {cfg.slicing.max_slice_nums} slices at {cfg.slicing.scale_resolution} px, "
          f"image ids {'on' if cfg.use_image_id else 'off'}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from minicpmv_jax.convert_weights import convert  # imports Orbax: only when converting

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        r = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, quantize=args.quantize)
    for w in caught:
        print(f"minicpmv-jax convert: warning: {w.message}", file=sys.stderr)
    dtypes = ", ".join(f"{n} {d}" for d, n in r.stored_dtypes.items())
    quantized = "" if r.quantization is None else f", llm projections {r.quantization.mode}"
    print(f"converted    {args.src} -> {r.dst}: {r.num_arrays} arrays ({dtypes}{quantized}), "
          f"{r.num_parameters / 1e9:.3f} B parameters, {r.bytes_written / 2**30:.2f} GiB in {r.seconds:.1f} s")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from minicpmv_jax.memory_plan import format_plan, plan_memory

    if args.prompt_len is not None and not args.compile:
        raise ArgumentError("{} is the length of the compiled prefill: add {}", "prompt_len", "compile=True")
    result = plan_memory(args.model, args.mesh, batch=args.batch, max_len=args.max_len, dtype=args.dtype,
                         quantize=args.quantize)
    if result.quantization is not None and args.compile:   # --quantize, or a folder converted with it
        raise ArgumentError("{} compiles the float model only: a quantized plan counts the parameters "
                            "(leave out {})", "compile=True", "compile=True")
    compiled = None
    if args.compile:
        if args.prompt_len is None:
            raise ArgumentError("{} needs {} (the prompt length to compile the prefill for)", "compile=True",
                                "prompt_len")
        shape = sharding.parse_mesh_shape(args.mesh)
        mesh = None if shape == (1, 1, 1) else sharding.make_mesh(*shape)
        compiled = compiled_memory(args.model, prompt_len=args.prompt_len, batch=args.batch,
                                   max_new_tokens=args.new_tokens, dtype=args.dtype, attention=args.attention,
                                   mesh=mesh)
    if args.json:
        out = {"plan": {"mesh": list(result.mesh_shape), "dtype": result.dtype,
                        "quantization": None if result.quantization is None else result.quantization.to_json(),
                        "batch": result.batch,
                        "max_len": result.max_len, "param_bytes_per_device": result.param_bytes_per_device,
                        "kv_cache_bytes_per_device": result.kv_cache_bytes_per_device,
                        "bytes_per_device": result.bytes_per_device,
                        "tower_bytes_per_device": {t.name: t.per_device_bytes for t in result.towers}}}
        if compiled is not None:
            out.update(compiled.to_json())
        print(json.dumps(out))
        return 0
    print(format_plan(result, args.device_memory))
    if compiled is not None:
        print()
        print(format_compiled(compiled))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpmv-jax", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"minicpmv-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="check a checkpoint folder against its config and summarise it",
                          description="Check a checkpoint folder against its config and summarise it.")
    info.add_argument("--model", required=True, type=path_arg, help="a checkpoint folder: HF format (safetensors) "
                      "or converted by 'minicpmv-jax convert'")
    info.set_defaults(func=_info)
    conv = sub.add_parser("convert", help="convert an HF safetensors checkpoint to a folder with Orbax parameters",
                          description="Convert an HF safetensors checkpoint to a folder with Orbax parameters, "
                          "tensor by tensor; DST is written whole or not at all.")
    conv.add_argument("src", metavar="SRC", type=path_arg, help="HF-format checkpoint folder (single or sharded "
                      "safetensors), a Hugging Face Hub id (needs the 'hub' extra), or 'demo' (a tiny random-weight "
                      "checkpoint to try conversion on)")
    conv.add_argument("dst", metavar="DST", type=path_arg, help="output folder; must not exist unless --overwrite")
    conv.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                      help="cast every parameter (default: keep the source dtypes)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace DST (only a folder this command wrote); it stays intact if converting fails")
    conv.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="store the language model's projections quantized, weight-only (int8: a scale per "
                      "output channel; int4: per output channel and 128 inputs, two values per byte); the "
                      "folder then loads quantized (default: keep them in --dtype)")
    conv.set_defaults(func=_convert)
    add_chat_parser(sub)
    add_generate_parser(sub)
    add_finetune_parser(sub)
    add_serve_parser(sub)
    plan = sub.add_parser("plan", help="per-device memory of parameters and KV cache on a mesh (no weights read)")
    plan.add_argument("--model", default="minicpmv-2_6", type=path_arg,
                      help="checkpoint folder, its config.json, or a preset "
                      "(minicpmv-2_6, tiny); default minicpmv-2_6")
    plan.add_argument("--mesh", required=True, metavar="DxFxT", help="data × fsdp × tensor sizes, e.g. 1x4x2 "
                      "(positive integers: the devices need not exist)")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--max-len", type=int, default=4096, help="KV cache slots per sequence (prompt + answer)")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    plan.add_argument("--quantize", choices=["int8", "int4"], default=None,
                      help="the language model's projections quantized as from_pretrained(quantize=) holds "
                      "them (default: a converted folder's own scheme, else none)")
    plan.add_argument("--device-memory", type=float, metavar="GIB",
                      help="memory per device (e.g. 16 for TPU v5e, 80 for H100) to report the headroom")
    plan.add_argument("--compile", action="store_true",
                      help="also lower and compile the prefill (at --prompt-len) and one decode step on this "
                      "backend, weights abstract, and print XLA's memory analysis per device; the mesh must "
                      "then exist on this process's devices")
    plan.add_argument("--prompt-len", type=int, metavar="T", help="prompt tokens of the compiled prefill")
    plan.add_argument("--new-tokens", type=int, default=16, metavar="N",
                      help="new-token buffer of the compiled programs (default 16; the cache has T + N slots)")
    plan.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                      help="attention kernel of the compiled programs (default auto: the best for this backend)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    plan.set_defaults(func=_plan)
    return parser


def flag_namer(parser: argparse.ArgumentParser, aliases: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """Python's spelling of a setting → ``parser``'s flag: ``max_new_tokens`` → ``--max-new-tokens``,
    ``resume=True`` → ``--resume``, ``on_bad='skip'`` → ``--on-bad skip``; a setting without a flag is
    left as it is. ``aliases`` maps settings named otherwise than the flag's dest to that dest
    (``DataConfig.batch_size`` → ``batch_size``; a subcommand declares them as its ``setting_aliases``
    default). Used to word :class:`~minicpmv_jax.errors.ArgumentError` for the command line."""
    aliases = aliases or {}
    flags: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse keeps its actions here; there is no public accessor
        if action.option_strings:
            flags.setdefault(action.dest, action)

    def name(setting: str) -> str:
        dest, eq, value = setting.partition("=")
        action = flags.get(aliases.get(dest, dest))
        if action is None:
            return setting
        flag = max(action.option_strings, key=len)
        if not eq:
            return flag
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            literal = value
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(literal, bool):
            plain = next(o for o in action.option_strings if not o.startswith("--no-"))
            return plain if literal else "--no-" + plain[2:]
        if action.nargs == 0:  # store_true / store_false: the flag sets its const, leaving it out the default
            return flag if literal == action.const else f"no {flag}"
        return f"{flag} {literal}"

    return name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = flag_namer(_subparser(parser, args.command), getattr(args, "setting_aliases", None))
    args.error_message = lambda e: e.worded(name) if isinstance(e, ArgumentError) else str(e)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"minicpmv-jax {args.command}: error: {args.error_message(e)}", file=sys.stderr)
        return 2


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


if __name__ == "__main__":
    sys.exit(main())
