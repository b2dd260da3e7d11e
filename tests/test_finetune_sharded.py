"""The train step on 8 simulated devices equals the unsharded step (loss, metrics and updated parameters,
float32, relative ≤ 1e-5), with the parameters and the optimizer moments really split over fsdp: full
fine-tuning of the LLM and the resampler on a batch with images (the frozen vision encoder runs sharded
too; its gradients against torch are in test_finetune_parity.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from minicpmv_jax import sharding
from helpers import assert_same_update, make_batch, train_config
from minicpmv_jax import MiniCPMV
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.finetune.config import TrainConfig
from minicpmv_jax.finetune.export import export_model
from minicpmv_jax.finetune.train_step import Trainer
from minicpmv_jax.testing.checkpoint import write_checkpoint
from reference import rel_err

MESHES = [(1, 8, 1), (2, 4, 1)]
# A large Adam epsilon keeps the first update smooth in the gradient (else it is ~lr·sign(g), and a
# gradient that rounds to either side of 0 would flip it).
# The loss in chunks of 32 positions (3 for the 80-token rows): the chunked loss runs sharded too.
CONFIG = TrainConfig(learning_rate=1e-2, total_steps=10, adam_eps=1e-3, weight_decay=0.01, compute_dtype="float32",
                     train_vision=False, train_resampler=True, loss_chunk=32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_sharded")
    write_checkpoint(folder, train_config(), seed=31, num_shards=1, tokenizer=False)
    return str(folder)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(8)
    rows = [{"tokens": 80, "image": (3, 4), "image_at": 2}, {"tokens": 41}, {"tokens": 77, "image": (5, 2)},
            {"tokens": 80}, {"tokens": 66}, {"tokens": 80, "image": (2, 2), "image_at": 9}, {"tokens": 23}]
    return make_batch(rng, rows, length=80, num_rows=8)        # row 7: padding


def _step(base, batch, mesh):
    trainer = Trainer(MiniCPMV.from_pretrained(base, dtype="float32", mesh=mesh), CONFIG)
    state = trainer.init_state()
    before = dict(ock.flatten(jax.device_get(state.params)))
    shares = _largest_share(state.params), _largest_share(state.opt_state)
    state, metrics = trainer.train_step(state, trainer.put_batch([batch]))
    return before, dict(ock.flatten(jax.device_get(state.params))), jax.device_get(metrics), shares, (trainer, state)


def _largest_share(tree) -> float:
    """Bytes on the fullest device / all bytes of the tree's arrays (1.0: everything replicated)."""
    leaves = [x for x in jax.tree.leaves(tree) if x.ndim >= 1]
    total = sum(x.nbytes for x in leaves)
    per_device: dict = {}
    for x in leaves:
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) / total


@pytest.fixture(scope="module")
def unsharded(base, batch):
    return _step(base, batch, None)


@pytest.fixture(scope="module")
def sharded_runs(base, batch):
    """``shape → _step(...)`` on that mesh, each run once per module."""
    runs: dict = {}

    def run(shape):
        if shape not in runs:
            runs[shape] = _step(base, batch, sharding.make_mesh(*shape))
        return runs[shape]

    return run


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_train_step_equals_unsharded(shape, sharded_runs, unsharded):
    before, after, metrics, (param_share, opt_share), (trainer, state) = sharded_runs(shape)
    ref_before, ref_after, ref_metrics, _, _ = unsharded
    fsdp = shape[1]
    # The moments (mu, nu) live like their parameters; norms and head biases are replicated by design.
    assert param_share <= 1.5 / fsdp and opt_share <= 1.5 / fsdp, (param_share, opt_share)
    q = state.params["llm"]["layers"]["0"]["attn"]["q"]["kernel"]
    assert q.sharding.spec[0] == "fsdp" and len(q.sharding.device_set) == 8
    for key in ("loss", "grad_norm", "learning_rate"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), rel=1e-5), key
    assert int(metrics["tokens"]) == int(ref_metrics["tokens"]) > 0
    assert_same_update(before, after, ref_before, ref_after, CONFIG.learning_rate)


def test_export_from_sharded_arrays(base, sharded_runs, unsharded, tmp_path):
    """A model whose parameters are split over 8 devices exports (each shard written) and loads back."""
    _, ref_after, _, _, _ = unsharded
    _, _, _, _, (trainer, state) = sharded_runs((1, 8, 1))
    tuned = trainer.model(state)
    assert len(tuned.llm.layers[0].mlp.up.kernel.get_value().sharding.device_set) == 8
    export_model(tuned, tmp_path / "out", base_model=base)
    loaded = MiniCPMV.from_pretrained(tmp_path / "out", dtype="float32")
    stored = {ock.tree_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(loaded, nnx.Param))}
    for key, ref in ref_after.items():                                # the trained parameters, as trained
        assert rel_err(stored[key], ref) <= 1e-5, key
