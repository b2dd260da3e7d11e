"""The ``minicpmv-jax`` command line.

Subcommands available in this build:

    minicpmv-jax info --model PATH     check a checkpoint folder against its config and summarise it
    minicpmv-jax convert SRC DST       convert an HF safetensors checkpoint to a folder with Orbax parameters
    minicpmv-jax chat --model M PROMPT answer a prompt about images (--image) or a video (--video)
    minicpmv-jax generate --model M --input requests.jsonl --output answers.jsonl   batched answers
    minicpmv-jax plan --mesh DxFxT [--model M] [--batch B --max-len L]   per-device memory on a mesh
    minicpmv-jax finetune --model M --data train.json --output DIR [--lora-rank R | --full] [--steps N] ...
                                       LoRA or full fine-tuning, resumable; exports DIR/model

``--model`` takes a checkpoint folder, a Hugging Face Hub id (downloaded and converted once), or ``demo``
(a tiny random-weight model for trying the pipeline offline; its answers are noise).

Errors in the user's input (a bad folder, config or tensor) are reported in one line naming the file,
key or tensor, with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings

from flax import nnx

from . import __version__, orbax_checkpoint
from . import checkpoint_names as names
from .cli_finetune import add_finetune_parser
from .cli_generate import add_chat_parser, add_generate_parser
from .config import ConfigError, MiniCPMVConfig, num_parameters
from .hf_checkpoint import CheckpointError, HFCheckpoint
from .model import MiniCPMV, _extra_vision_layers


def _info(args: argparse.Namespace) -> int:
    cfg = MiniCPMVConfig.from_pretrained(args.model)
    if orbax_checkpoint.is_converted(args.model):
        abstract = nnx.eval_shape(lambda: MiniCPMV(cfg, rngs=nnx.Rngs(0)))
        stored = orbax_checkpoint.check_params(args.model, abstract)
        dtypes = collections.Counter(str(dtype) for _, dtype in stored.values())
        print(f"checkpoint   {args.model}: converted (Orbax), {len(stored)} arrays, dtypes {dict(dtypes)}: OK")
    else:
        ckpt = HFCheckpoint.open(args.model)
        ckpt.validate(names.expected_tensors(cfg), extra_ok=_extra_vision_layers(cfg))
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
    from convert_weights import convert  # imports Orbax: only when converting

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        r = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    for w in caught:
        print(f"minicpmv-jax convert: warning: {w.message}", file=sys.stderr)
    dtypes = ", ".join(f"{n} {d}" for d, n in r.stored_dtypes.items())
    print(f"converted    {args.src} -> {r.dst}: {r.num_arrays} arrays ({dtypes}), "
          f"{r.num_parameters / 1e9:.3f} B parameters, {r.bytes_written / 2**30:.2f} GiB in {r.seconds:.1f} s")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sharding import format_plan, plan_memory

    result = plan_memory(args.model, args.mesh, batch=args.batch, max_len=args.max_len, dtype=args.dtype)
    print(format_plan(result, args.device_memory))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpmv-jax", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"minicpmv-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="check a checkpoint folder against its config and summarise it")
    info.add_argument("--model", required=True, help="HF-format MiniCPM-V checkpoint folder")
    info.set_defaults(func=_info)
    conv = sub.add_parser("convert", help="convert an HF safetensors checkpoint to a folder with Orbax parameters")
    conv.add_argument("src", metavar="SRC", help="HF-format checkpoint folder (single or sharded safetensors), or "
                      "a Hugging Face Hub id (needs the `hub` extra)")
    conv.add_argument("dst", metavar="DST", help="output folder; must not exist unless --overwrite")
    conv.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                      help="cast every parameter (default: keep the source dtypes)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace DST (only a folder this command wrote); it stays intact if converting fails")
    conv.set_defaults(func=_convert)
    add_chat_parser(sub)
    add_generate_parser(sub)
    add_finetune_parser(sub)
    plan = sub.add_parser("plan", help="per-device memory of parameters and KV cache on a mesh (no weights read)")
    plan.add_argument("--model", default="minicpmv-2_6", help="checkpoint folder, its config.json, or a preset "
                      "(minicpmv-2_6, tiny); default minicpmv-2_6")
    plan.add_argument("--mesh", required=True, metavar="DxFxT", help="data × fsdp × tensor sizes, e.g. 1x4x2")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--max-len", type=int, default=4096, help="KV cache slots per sequence (prompt + answer)")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    plan.add_argument("--device-memory", type=float, metavar="GIB",
                      help="memory per device (e.g. 16 for TPU v5e, 80 for H100) to report the headroom")
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"minicpmv-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
