"""The ``finetune`` subcommand of ``minicpmv-jax`` (see :mod:`minicpmv_jax.cli`): LoRA or full fine-tuning
on a data file of the reference format, with the loop of :mod:`minicpmv_jax.finetune.trainer`.

    minicpmv-jax finetune --model PATH|demo|HUB_ID --data train.json --output DIR [--eval-data held_out.json]
        [--lora-rank R --lora-alpha A --lora-dropout P --lora-targets RE ...] [--full]
        [--train-vision] [--no-train-resampler] [--steps N | --epochs E] [--batch-size B] [--grad-accum K]
        [--lr LR] [--warmup N] [--weight-decay W] [--max-grad-norm G] [--max-length L] [--mesh DxFxT]
        [--seed S] [--save-every N] [--eval-every N] [--log-every N] [--resume] [--on-bad skip|error]
        [--dtype bfloat16|float32|float16] [--quantize int8|int4] [--max-slice-nums N] [--keep-checkpoints N]
        [--no-export]

It writes ``DIR/log.jsonl``, ``DIR/checkpoints/`` and, at the end, ``DIR/model`` (LoRA merged), which
``minicpmv-jax chat --model DIR/model`` loads. ``--resume`` continues an interrupted run from its latest
checkpoint with the same data order; without it ``DIR`` must be new or empty. ``--dtype`` is the dtype the
base weights are loaded in, the computation dtype and the exported model's dtype; trained parameters and
the optimizer state are float32 whatever it is.

``--quantize int8|int4`` loads the base with its language model's projections quantized
(``MiniCPMV.from_pretrained(..., quantize=)``) and trains LoRA adapters over them (QLoRA; ``--full`` is
refused: integer weights cannot be trained). Checkpoints record it, ``--resume`` must give it again, and
``DIR/model`` is a float model in ``--dtype`` (adapters merged into the dequantized kernels).

Input errors (an unreadable or bad data file, a bad mesh, an existing output folder, a checkpoint of other
settings) are one line on stderr and exit status 2, before the model is loaded where possible. They name
the flag at fault (``--batch-size 2``), not the library setting behind it (``DataConfig.batch_size=2``):
the library raises :class:`~minicpmv_jax.errors.ArgumentError`, and ``_DESTS`` (this subcommand's
``setting_aliases``) maps its settings to the flags' dests.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from typing import Any

from minicpmv_jax.cli_generate import path_arg
from minicpmv_jax.errors import ArgumentError

__all__ = ["add_finetune_parser"]

#: ``finetune --help``'s description (the module docstring is reStructuredText).
DESCRIPTION = ("LoRA or full fine-tuning on a JSON or JSONL data file of the reference (OpenBMB MiniCPM-V "
               "finetune) format. Writes DIR/log.jsonl, DIR/checkpoints/ and, at the end, DIR/model (LoRA merged), "
               "which 'minicpmv-jax chat --model DIR/model' loads; --resume continues an interrupted run. "
               "--quantize int8|int4 trains LoRA over a quantized base (QLoRA); DIR/model is then a float model.")

#: Learning rates by default: LoRA adapters start from zero and take larger steps than full fine-tuning.
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5}

#: The settings that :func:`~minicpmv_jax.finetune.trainer.fit` names in its errors (its arguments and the
#: TrainConfig / DataConfig fields) → the dests of the flags that set them here, for ``cli.flag_namer`` to
#: name the flags. A setting missing here has the name of its dest (``output``, ``resume``) or no flag.
_DESTS = {
    "dataset": "data",
    "DataConfig.max_length": "max_length", "DataConfig.batch_size": "batch_size", "DataConfig.seed": "seed",
    "DataConfig.max_slice_nums": "max_slice_nums",
    "TrainConfig.learning_rate": "lr", "TrainConfig.warmup_steps": "warmup", "TrainConfig.weight_decay": "weight_decay",
    "TrainConfig.max_grad_norm": "max_grad_norm", "TrainConfig.grad_accum_steps": "grad_accum",
    "TrainConfig.seed": "seed", "TrainConfig.train_vision": "train_vision",
    "TrainConfig.train_resampler": "train_resampler", "TrainConfig.compute_dtype": "dtype",
    "TrainConfig.lora.rank": "lora_rank", "TrainConfig.lora.alpha": "lora_alpha",
    "TrainConfig.lora.dropout": "lora_dropout", "TrainConfig.lora.target_modules": "lora_targets",
    "LoRAConfig.target_modules": "lora_targets",
}


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune (LoRA or full) on a JSON/JSONL data file of the reference format",
                       description=DESCRIPTION)
    p.add_argument("--model", required=True, help="checkpoint folder (HF or converted), a Hugging Face Hub id, "
                   "or 'demo' (tiny random weights, offline)")
    p.add_argument("--data", required=True, metavar="FILE", type=path_arg, help="training samples: JSON list or JSONL")
    p.add_argument("--output", required=True, metavar="DIR", type=path_arg, help="run folder: log.jsonl, checkpoints/, model/")
    p.add_argument("--eval-data", metavar="FILE", type=path_arg, help="held-out samples for the evaluation loss")
    lora = p.add_argument_group("what is trained")
    lora.add_argument("--full", action="store_true", help="full fine-tuning of the language model (default: LoRA)")
    lora.add_argument("--lora-rank", type=_positive(int), default=8)
    lora.add_argument("--lora-alpha", type=_positive(float), default=None, help="default: 2 × rank")
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-targets", nargs="+", metavar="RE", default=None,
                      help="regexes over module paths, first match decides, '!RE' excludes (default: "
                      r"'llm/layers/\d+/attn/(q|k|v|o)')")
    lora.add_argument("--train-vision", action=argparse.BooleanOptionalAction, default=False,
                      help="also train the vision encoder (default: frozen)")
    lora.add_argument("--train-resampler", action=argparse.BooleanOptionalAction, default=True,
                      help="also train the resampler (default: trained)")
    opt = p.add_argument_group("optimization")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive(int), help="optimizer steps (default: one epoch)")
    length.add_argument("--epochs", type=_positive(float), help="passes over the data (default 1)")
    opt.add_argument("--batch-size", type=_positive(int), default=1, help="rows per micro-batch")
    opt.add_argument("--grad-accum", type=_positive(int), default=1, help="micro-batches per optimizer step")
    opt.add_argument("--lr", type=_positive(float), default=None,
                     help=f"peak learning rate (default {DEFAULT_LR['lora']:g} LoRA, {DEFAULT_LR['full']:g} full)")
    opt.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warmup steps, then cosine")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="global-norm clipping (0: none)")
    opt.add_argument("--max-length", type=_positive(int), default=2048, help="longest sample in tokens (longer "
                     "samples are bad samples)")
    opt.add_argument("--seed", type=int, default=0, help="data order, LoRA init and dropout")
    opt.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    opt.add_argument("--quantize", choices=["int8", "int4"], default=None,
                     help="QLoRA: load the language model's projections quantized (int8: per output channel; int4: "
                     "groups of 128) and train LoRA adapters over them; the exported model is float (--dtype)")
    opt.add_argument("--no-remat", action="store_true", help="keep every layer's activations (faster, more memory)")
    opt.add_argument("--loss-chunk", type=_positive(int), default=None, metavar="N",
                     help="compute lm_head and the loss N positions at a time (default: TrainConfig's, 512); "
                     "0 is not allowed: use --no-loss-chunk")
    opt.add_argument("--no-loss-chunk", action="store_true", help="materialise the whole [B, T, vocab] logits")
    run = p.add_argument_group("run")
    run.add_argument("--mesh", metavar="DxFxT", help="data × fsdp × tensor device mesh, e.g. 1x8x1 (-1: the rest "
                     "of the devices); default: one device")
    run.add_argument("--save-every", type=_positive(int), default=500)
    run.add_argument("--keep-checkpoints", type=_positive(int), default=3)
    run.add_argument("--eval-every", type=_positive(int), default=None, help="default: after the last step only")
    run.add_argument("--log-every", type=_positive(int), default=10)
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    run.add_argument("--on-bad", choices=["skip", "error"], default="skip", help="bad samples: skip them with a "
                     "warning, or refuse the data file")
    run.add_argument("--max-slice-nums", type=_positive(int), default=None, help="override the checkpoint's")
    run.add_argument("--no-export", action="store_true", help="do not write DIR/model at the end")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_finetune, setting_aliases=_DESTS)


def _train_config(args: argparse.Namespace, total_steps: int):
    from minicpmv_jax.finetune.config import DEFAULT_LORA_TARGETS, LoRAConfig, TrainConfig

    lora = None
    if not args.full:
        lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          dropout=args.lora_dropout, target_modules=tuple(args.lora_targets or DEFAULT_LORA_TARGETS))
    lr = args.lr if args.lr is not None else DEFAULT_LR["full" if args.full else "lora"]
    if args.warmup > total_steps:
        raise ValueError(f"--warmup {args.warmup} is more than the {total_steps} steps of the run")
    return TrainConfig(learning_rate=lr, warmup_steps=args.warmup, total_steps=total_steps,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
                       grad_accum_steps=args.grad_accum, seed=args.seed, lora=lora, train_vision=args.train_vision,
                       train_resampler=args.train_resampler, remat=not args.no_remat, compute_dtype=args.dtype,
                       **_loss_chunk(args))


def _loss_chunk(args: argparse.Namespace) -> dict:
    if args.no_loss_chunk and args.loss_chunk is not None:
        raise ValueError("--loss-chunk and --no-loss-chunk contradict each other")
    if args.no_loss_chunk:
        return {"loss_chunk": None}
    return {} if args.loss_chunk is None else {"loss_chunk": args.loss_chunk}


def _one_line(text: str) -> str:
    """A multi-line message (e.g. the list of bad samples) joined into one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


def _cli_setting(name: str, value: Any) -> str:
    """A setting of ``fit`` and its value (``TrainConfig.grad_accum_steps``, 2) spelled with the value its
    flag takes (``TrainConfig.grad_accum_steps=2``), which ``cli.main`` words as the flag
    (``--grad-accum 2``, through :data:`_DESTS`). LoRA or not is ``--lora-rank R`` or ``--full``; no
    gradient clipping is ``--max-grad-norm 0``; a float base is "no --quantize"."""
    if name == "TrainConfig.lora":
        return "full=True" if value is None else f"lora_rank={value.rank}"
    if name == "quantize" and value is None:        # a base loaded without --quantize
        return "no --quantize"
    if name == "TrainConfig.max_grad_norm" and value is None:
        value = 0
    if isinstance(value, tuple):                     # --lora-targets RE [RE ...]
        value = " ".join(value)
    return f"{name}={value!r}"


def _datasets(args: argparse.Namespace, processor):
    from minicpmv_jax.finetune.batching import FinetuneDataset
    from minicpmv_jax.finetune.data import DataConfig, SampleError, SkippedSamplesWarning

    config = DataConfig(max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
                        max_slice_nums=args.max_slice_nums, on_bad=args.on_bad)
    eval_config = DataConfig(max_length=args.max_length, batch_size=args.batch_size, shuffle=False,
                             max_slice_nums=args.max_slice_nums, on_bad=args.on_bad)
    out = []
    for path, cfg in ((args.data, config), (args.eval_data, eval_config)):
        if path is None:
            out.append(None)
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out.append(FinetuneDataset.from_file(path, processor, cfg))
            except SampleError as e:
                raise ValueError(_one_line(e.report) + ("; --on-bad skip leaves them out" if e.skippable else "")
                                 ) from None
        for w in caught:
            text = (_one_line(w.message.report) + "; they are skipped (--on-bad skip)"
                    if isinstance(w.message, SkippedSamplesWarning) else _one_line(str(w.message)))
            print(f"minicpmv-jax finetune: warning: {text}", file=sys.stderr)
    return out


def _finetune(args: argparse.Namespace) -> int:
    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, sharding
    from minicpmv_jax.cli_generate import model_folder
    from minicpmv_jax.finetune.trainer import LoopConfig, SettingChangedError, check_output, fit

    # Cheap checks first: the model may take minutes to load.
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.full and args.quantize:
        raise ArgumentError("{} trains every weight of the language model, but {} loads its projections as "
                            "integers, which cannot be trained: leave out {} to train LoRA adapters over the "
                            "quantized model (QLoRA), or {} for full fine-tuning", "full=True",
                            f"quantize={args.quantize!r}", "full=True", "quantize")
    mesh = None if args.mesh is None else sharding.mesh_from_text(args.mesh)
    output = os.path.abspath(args.output)
    check_output(output, args.resume)
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file")

    folder = model_folder(args.model)
    processor = MiniCPMVProcessor.from_pretrained(folder)
    train_data, eval_data = _datasets(args, processor)
    batches = train_data.steps_per_epoch()
    total_steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * batches / args.grad_accum))
    config = _train_config(args, total_steps)
    loop = LoopConfig(log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                      max_to_keep=args.keep_checkpoints, resume=args.resume, export=not args.no_export,
                      export_dtype=args.dtype, progress=not args.no_progress)
    try:
        # No reference kept to the model: the load-dtype copies of the trained parameters are freed in fit.
        result = fit(MiniCPMV.from_pretrained(folder, dtype=args.dtype, mesh=mesh, quantize=args.quantize),
                     train_data, config, output, base_model=folder, eval_dataset=eval_data, loop=loop)
    except SettingChangedError as e:    # resuming with other settings: the values as the flags take them
        raise SettingChangedError(e.output, e.step, e.setting, e.before, e.now, spell=_cli_setting) from None
    train = [e for e in result.log if "loss" in e]
    evals = [e for e in result.log if "eval_loss" in e]
    summary = f"finetune: {int(result.state.step)} steps"
    if train:
        summary += f", loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}"
    if evals:
        summary += f", eval_loss {evals[-1]['eval_loss']:.4f}"
    print(summary + (f"; model in {result.model_dir}" if result.model_dir else f"; run in {output}"))
    return 0
