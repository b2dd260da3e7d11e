"""Multi-host: 2 processes × 4 CPU devices on 127.0.0.1 (jax.distributed, gloo collectives) restore a
converted checkpoint onto one 8-device mesh and give the same logits and greedy answer as one process."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers import noise_image
from minicpmv_jax.convert_weights import convert
from minicpmv_jax.processor import IMAGE_TAG
from reference import rel_err

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _run_workers(args) -> None:
    """Runs two worker processes (``args(port, process_id)`` → the script and its arguments) joined on a free
    port, each with 4 CPU devices (the script sets them); fails with a worker's log if one fails."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, *args(port, i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker process timed out")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]



@pytest.mark.parametrize("mesh", ["1x8x1", "2x2x2"])
def test_two_processes_match_one(tmp_path, tiny_checkpoint, tiny_model, tiny_processor, mesh):
    folder = tmp_path / "converted"
    convert(tiny_checkpoint[0], folder, progress=False)
    tok = tiny_processor.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": IMAGE_TAG + "\nWhat is this?"}]),
             tok.apply_chat_template([{"role": "user", "content": "And a text-only question."}])]
    batch = tiny_processor(texts, [[noise_image(0, 300, 200)], []])
    msgs = [{"role": "user", "content": [noise_image(1, 200, 200), "Describe it."]}]
    inputs = tmp_path / "inputs.pkl"
    inputs.write_bytes(pickle.dumps({"batch": batch, "msgs": msgs}))

    _run_workers(lambda port, i: [WORKER, str(port), str(i), "2", str(folder), str(inputs),
                                  str(tmp_path / f"out{i}.npz"), mesh])

    want_logits = np.asarray(tiny_model.compute_logits(batch))
    want_answer = tiny_model.chat(msgs=msgs, processor=tiny_processor, sampling=False, num_beams=1,
                                  max_new_tokens=6)
    full_embed = tiny_model.llm.embed_tokens.embedding.get_value().nbytes
    mask = batch["attention_mask"]
    for i in range(2):
        out = np.load(tmp_path / f"out{i}.npz")
        assert int(out["process_count"]) == 2 and int(out["device_count"]) == 8
        assert rel_err(out["logits"][mask], want_logits[mask]) <= 1e-5
        assert str(out["answer"]) == want_answer
        # Each device holds only its shard of the embedding (split over fsdp × tensor); with no data axis
        # the two processes hold disjoint halves of it.
        _, fsdp, tensor = (int(x) for x in mesh.split("x"))
        assert int(out["device_embed_bytes"]) == full_embed // (fsdp * tensor)
        if mesh == "1x8x1":
            assert int(out["local_embed_bytes"]) == full_embed // 2


ENGINE_WORKER = os.path.join(os.path.dirname(__file__), "multihost_engine_worker.py")


def test_engine_on_two_processes_answers_as_on_one(tmp_path, tiny_checkpoint, tiny_model, tiny_processor):
    """Process 0 takes the requests and schedules; process 1 follows (the same programs in the same order,
    its decisions replayed from process 0's inputs); the answers are those of ``chat`` on one process."""
    from minicpmv_jax.engine import request_from_messages
    from minicpmv_jax.generation_config import GenerationConfig

    convs = [[{"role": "user", "content": [noise_image(2, 120, 90), "What is it?"]}],
             [{"role": "user", "content": "Hello, who are you?"}],
             [{"role": "user", "content": "Count."}]]
    lengths = [6, 9, 4]
    greedy = dict(sampling=False, num_beams=1)
    requests = [request_from_messages(tiny_processor, c, GenerationConfig.for_chat(max_new_tokens=n, **greedy))
                for c, n in zip(convs, lengths)]
    inputs = tmp_path / "requests.pkl"
    inputs.write_bytes(pickle.dumps(requests))
    _run_workers(lambda port, i: [ENGINE_WORKER, str(port), str(i), tiny_checkpoint[0], str(inputs),
                                  str(tmp_path / f"engine{i}.pkl"), "1x4x2"])
    leader, follower = (pickle.loads((tmp_path / f"engine{i}.pkl").read_bytes()) for i in range(2))
    tok = tiny_processor.tokenizer
    for conv, n, ids in zip(convs, lengths, leader["answers"]):
        assert tok.decode([t for t in ids if t not in tok.stop_ids]).strip() == \
            tiny_model.chat(msgs=conv, processor=tiny_processor, max_new_tokens=n, **greedy)
    assert leader["answers"][-1] == "cancelled"
    assert (follower["steps"], follower["generated"]) == (leader["steps"], leader["generated"]) > (0, 0)
