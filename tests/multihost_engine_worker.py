"""One process of the multi-host engine test (tests/test_multihost.py): joins a 2-process CPU cluster on
127.0.0.1 (gloo, 4 local devices each), loads the checkpoint onto a mesh over both processes and runs the
serving engine: process 0 submits the requests and drives the loop, process 1 follows. Each process writes
the answers its engine produced.

Usage: python multihost_engine_worker.py PORT PROCESS_ID CHECKPOINT INPUTS.pkl OUTPUT.pkl DxFxT
"""

import os
import pickle
import sys

port, pid, folder, inputs, output, mesh_shape = sys.argv[1:7]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))

from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, sharding  # noqa: E402
from minicpmv_jax.engine import Engine, EngineConfig  # noqa: E402

with open(inputs, "rb") as f:
    requests = pickle.load(f)
mesh = sharding.make_mesh(*sharding.parse_mesh_shape(mesh_shape))
model = MiniCPMV.from_pretrained(folder, dtype="float32", mesh=mesh)
engine = Engine(model, MiniCPMVProcessor.from_pretrained(folder), EngineConfig(max_batch=2, max_len=256))
if jax.process_index() == 0:
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    cancelled = engine.submit(requests[0])     # a request cancelled while queued
    cancelled.cancel()
    engine.run_until_idle()
    engine.stop()
    answers = [h.result().token_ids for h in handles] + [cancelled.finish_reason]
else:
    engine.follow()
    answers = None
with open(output, "wb") as f:
    pickle.dump({"answers": answers, "steps": engine.stats().steps, "generated": engine.stats().generated_tokens}, f)
jax.distributed.shutdown()
