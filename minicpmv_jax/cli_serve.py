"""The ``serve`` subcommand of ``minicpmv-jax`` (see :mod:`minicpmv_jax.cli`): an OpenAI-compatible HTTP
server (:mod:`minicpmv_jax.server`) over the serving engine (:mod:`minicpmv_jax.engine`).

    minicpmv-jax serve --model PATH|HUB_ID|demo [--dtype D] [--quantize int8|int4] [--attention A] [--mesh DxFxT]
                       [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [--api-key KEY]
                       [--max-batch N] [--max-len L] [--max-queue Q] [--prefill-chunk C]
                       [--allowed-local-media DIR] [--max-images N] [--max-image-bytes B] ...
                       [--drain-timeout S]

Settings are checked before the model loads, and the address is bound first (a port in use fails at
once); then the model loads, and one log line says ``serving NAME on http://HOST:PORT`` (the port the
system chose for ``--port 0``). SIGTERM or Ctrl-C stops accepting connections, lets the requests in
flight finish for at most ``--drain-timeout`` seconds (then cancels them), stops the engine and exits
with status 0.

Several hosts (one mesh over every process's devices): start the same command on every process with
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--multihost`` where
``jax.distributed.initialize()`` finds the cluster itself, as on Cloud TPU). Process 0 binds the address
and serves HTTP; the others run the engine's steps as process 0 schedules them
(:meth:`~minicpmv_jax.engine.Engine.follow`) and exit when it stops; they ignore SIGTERM meanwhile, so
that a signal sent to every process lets process 0 drain.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys

import jax

from minicpmv_jax import sharding
from minicpmv_jax.attention import IMPLEMENTATIONS
from minicpmv_jax.cli_generate import model_folder, path_arg
from minicpmv_jax.engine import Engine, EngineConfig
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.server.limits import Limits

__all__ = ["add_serve_parser"]

log = logging.getLogger("minicpmv_jax.serve")

SERVE_HELP = "serve the model over an OpenAI-compatible HTTP API"
#: The environment variable ``--api-key`` defaults to (a key on the command line shows in ``ps``).
API_KEY_ENV = "MINICPMV_JAX_API_KEY"
#: The help of the flags of :class:`~minicpmv_jax.server.limits.Limits`, one per field.
LIMIT_HELP = {
    "max_body_bytes": "bytes of a request body; more is refused with 413",
    "max_images": "images in one request",
    "max_image_bytes": "bytes of one encoded image",
    "max_image_pixels": "pixels (width × height) of one image",
    "max_video_frames": "video frames in one request (one per second of each video)",
    "max_video_bytes": "bytes of one encoded video",
    "max_frame_pixels": "pixels of one video frame",
}


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help=SERVE_HELP, description=(
        "Serve the model over an OpenAI-compatible HTTP API: POST /v1/chat/completions (text, images, videos; "
        "streaming), POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus). Requests are "
        "batched continuously over --max-batch decode slots."))
    p.add_argument("--model", required=True, help="checkpoint folder (HF or converted), a Hugging Face Hub id, "
                   "or 'demo' (tiny random weights, offline)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization of the language model's projections (int8: per output channel; int4: groups of 128), applied while loading; a folder converted with --quantize loads as written")
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                   help="the language model's attention kernel (default auto: the best for this backend)")
    p.add_argument("--mesh", metavar="DxFxT", help="data × fsdp × tensor device mesh to shard the model on, e.g. "
                   "1x1x4 (default: one device)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, logged)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients send (default: --model)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}; none: open)")
    defaults = EngineConfig()
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help=f"decode slots: requests generating at once (default {defaults.max_batch})")
    p.add_argument("--max-len", type=int, default=defaults.max_len,
                   help=f"tokens per request, prompt and answer together (default {defaults.max_len})")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue,
                   help=f"requests waiting for a slot; more are refused with 429 (default {defaults.max_queue})")
    p.add_argument("--prefill-chunk", type=int, default=defaults.prefill_chunk,
                   help="prompt tokens prefilled per scheduler step, decode steps in between (a power of two; "
                   f"default {defaults.prefill_chunk})")
    p.add_argument("--allowed-local-media", metavar="DIR", type=path_arg,
                   help="let file:// URLs name files under DIR (default: no file:// URLs)")
    limits = Limits()
    for field in dataclasses.fields(Limits):
        default = getattr(limits, field.name)
        p.add_argument("--" + field.name.replace("_", "-"), type=int, default=default, metavar="N",
                       help=f"{LIMIT_HELP[field.name]} (default {default:,})")
    hosts = p.add_argument_group("several hosts (one mesh over the devices of every process)")
    hosts.add_argument("--multihost", action="store_true",
                       help="join the cluster jax.distributed.initialize() detects (Cloud TPU, SLURM, …)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address for jax.distributed")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="processes in the cluster (with --coordinator)")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process's index (with --coordinator)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C, seconds the requests in flight may take to finish (default 30)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:  # the `serve` extra
        from minicpmv_jax.server import create_app
        from minicpmv_jax.server.media import local_media_root
        from minicpmv_jax.server.run import bind, run
    except ImportError as e:
        raise ValueError(f"serve needs the `serve` extra ({e.name} is not installed): pip install "
                         "'minicpmv-jax[serve]'") from None
    # Cheap checks first: the model may take minutes to load.
    config = EngineConfig(max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk)
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    local_media_root(args.allowed_local_media)
    if not 0 <= args.port <= 65535:
        raise ArgumentError("{} must be in 0..65535, got {value}", "port", value=args.port)
    if not args.drain_timeout >= 0:
        raise ArgumentError("{} must be ≥ 0 seconds, got {value}", "drain_timeout", value=args.drain_timeout)
    if args.api_key is not None and not args.api_key.strip():
        raise ArgumentError("{} is empty", "api_key")
    leader = _join_cluster(args)
    mesh = None if args.mesh in (None, "1x1x1") else sharding.mesh_from_text(args.mesh)
    _log_to_stderr()
    sock = bind(args.host, args.port) if leader else None   # a port in use fails now, not after loading

    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor

    folder = model_folder(args.model)
    model = MiniCPMV.from_pretrained(folder, dtype=args.dtype, mesh=mesh, attention=args.attention,
                                     quantize=args.quantize)
    processor = MiniCPMVProcessor.from_pretrained(folder)
    name = args.served_model_name or args.model
    if not leader:
        signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: following process 0 until it stops"))
        log.info("process %d follows process 0's engine", jax.process_index())
        Engine(model, processor, config).follow()
        return 0
    app = create_app(Engine(model, processor, config), processor, name, api_key=args.api_key,
                     allowed_local_media=args.allowed_local_media, limits=limits, drain_timeout=args.drain_timeout)
    run(app, sock, drain_timeout=args.drain_timeout, name=name)
    return 0


def _join_cluster(args: argparse.Namespace) -> bool:
    """Joins the multi-process cluster the flags name (if any); returns whether this is process 0."""
    explicit = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ArgumentError("{} go together: give all three (or --multihost to detect the cluster)",
                                "--coordinator, --num-processes and --process-id")
        if not 0 <= args.process_id < args.num_processes:
            raise ArgumentError("{} must be in 0..{last}, got {value}", "--process-id",
                                last=args.num_processes - 1, value=args.process_id)
    elif not args.multihost:
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes' collectives (else unused)
    if args.multihost and args.coordinator is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    return jax.process_index() == 0


def _log_to_stderr() -> None:
    """The package's log lines (one per request, the engine's) on stderr, beside uvicorn's."""
    logger = logging.getLogger("minicpmv_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
