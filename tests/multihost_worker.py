"""One process of the multi-host test (tests/test_multihost.py): joins a 2-process CPU cluster on
127.0.0.1 (gloo collectives, 4 local devices each), restores a converted checkpoint onto a global mesh,
and writes its logits and greedy answer for the parent test to compare.

Usage: python multihost_worker.py PORT PROCESS_ID NUM_PROCESSES CHECKPOINT INPUTS.pkl OUTPUT.npz DxFxT
"""

import os
import pickle
import sys

port, pid, nproc, folder, inputs, output, mesh_shape = sys.argv[1:8]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))

import numpy as np  # noqa: E402

from minicpmv_jax import sharding  # noqa: E402
from minicpmv_jax import MiniCPMV, MiniCPMVProcessor  # noqa: E402

with open(inputs, "rb") as f:
    data = pickle.load(f)
mesh = sharding.make_mesh(*sharding.parse_mesh_shape(mesh_shape))
model = MiniCPMV.from_pretrained(folder, dtype="float32", mesh=mesh)
processor = MiniCPMVProcessor.from_pretrained(folder)
shards = model.llm.embed_tokens.embedding.get_value().addressable_shards
local, per_device = sum(s.data.nbytes for s in shards), max(s.data.nbytes for s in shards)
logits = np.asarray(model.compute_logits(data["batch"]))
answer = model.chat(msgs=data["msgs"], processor=processor, sampling=False, num_beams=1, max_new_tokens=6)
np.savez(output, logits=logits, answer=np.array(answer), process_count=jax.process_count(),
         device_count=jax.device_count(), local_embed_bytes=local, device_embed_bytes=per_device)
jax.distributed.shutdown()
