"""Loss and gradients of the JAX train step equal torch autograd on the same tiny weights and batch
(float32, relative error ≤ 1e-4 on the loss and on every trained parameter's gradient): full fine-tuning
with the vision encoder and resampler trained and an image in the batch, its loss chunked (3 chunks of 32
positions, so ``lm_head``'s gradient goes through the chunked path), and LoRA with random non-zero
adapters (written by hand in torch: ``base(x) + scale · (x @ A) @ B``) and the loss over the whole
sequence at once."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from helpers import make_batch, train_config
from minicpmv_jax import MiniCPMV
from minicpmv_jax import checkpoint_names as names
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.finetune.config import LoRAConfig, TrainConfig
from minicpmv_jax.finetune.train_step import Trainer
from minicpmv_jax.testing.checkpoint import write_checkpoint
from reference import rel_err
from torch_train_reference import TorchTrainReference

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_parity")
    cfg = train_config()
    tensors = write_checkpoint(folder, cfg, seed=11, num_shards=1, tokenizer=False)
    return str(folder), cfg, tensors


def _batch(cfg, with_image: bool) -> dict:
    rng = np.random.default_rng(5)
    rows = [{"tokens": 96, "image": (4, 6), "image_at": 3} if with_image else {"tokens": 96},
            {"tokens": 57}]
    return make_batch(rng, rows, length=96, num_rows=3)     # row 2: an empty padding row


def test_full_finetune_loss_and_every_gradient_match_torch(checkpoint):
    folder, cfg, tensors = checkpoint
    batch = _batch(cfg, with_image=True)
    config = TrainConfig(compute_dtype="float32", train_vision=True, train_resampler=True, remat=True, loss_chunk=40)
    trainer = Trainer(MiniCPMV.from_pretrained(folder, dtype="float32"), config)
    state = trainer.init_state()
    grads, loss, tokens = trainer.gradients(state, trainer.put_batch([batch]))
    ref_loss, ref_tokens, ref_grads = TorchTrainReference(cfg, tensors).loss_and_grads(batch)
    assert int(tokens) == ref_tokens > 0
    assert rel_err(np.asarray(loss), np.asarray(ref_loss)) <= TOL
    ours = dict(ock.flatten(jax.device_get(grads)))
    entries = names.entries(cfg)
    assert set(ours) == {ock.tree_key(e.path) for e in entries}      # every parameter is trained
    scale = {t: max(np.abs(g).max() for k, g in ours.items() if k[0] == t) for t in names.TOWERS}
    for e in entries:
        mine, theirs = ours[ock.tree_key(e.path)], e.transform(ref_grads[e.name])
        assert mine.shape == theirs.shape, e.name
        if e.path[0] in ("vpm", "resampler") and e.path[-2:] == ("k", "bias"):
            # Without RoPE a key bias adds q·b to every key of a query alike: softmax cancels it, the exact
            # gradient is 0 and both sides hold rounding noise. Checked against the tower's gradient scale.
            assert np.abs(mine).max() <= 1e-6 * scale[e.path[0]] and np.abs(theirs).max() <= 1e-6 * scale[e.path[0]]
            continue
        assert np.abs(theirs).max() > 1e-6 * scale[e.path[0]], e.name
        assert rel_err(mine, theirs) <= TOL, (e.name, rel_err(mine, theirs))


def test_lora_loss_and_adapter_gradients_match_torch(checkpoint):
    folder, cfg, tensors = checkpoint
    batch = _batch(cfg, with_image=False)
    lora = LoRAConfig(rank=3, alpha=7.0)
    trainer = Trainer(MiniCPMV.from_pretrained(folder, dtype="float32"),
                      TrainConfig(compute_dtype="float32", lora=lora, train_resampler=False, loss_chunk=None))
    state = trainer.init_state()
    # A as initialised (kaiming-uniform); B random instead of zero, else A's gradient would be zero.
    rng = np.random.default_rng(3)
    params = jax.device_get(state.params)
    for layer in params["llm"]["layers"].values():
        for proj in layer["attn"].values():
            assert np.abs(proj["lora_a"]).max() > 0 and not np.any(proj["lora_b"])
            proj["lora_b"] = rng.normal(0, 0.1, proj["lora_b"].shape).astype(np.float32)
    state = dataclasses.replace(state, params=jax.tree.map(jax.numpy.asarray, params))
    grads, loss, tokens = trainer.gradients(state, trainer.put_batch([batch]))

    torch_name = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    adapters = {}
    for i in range(cfg.llm.num_hidden_layers):
        for ours, theirs in torch_name.items():
            p = params["llm"]["layers"][str(i)]["attn"][ours]
            adapters[(i, theirs)] = (p["lora_a"].reshape(-1, lora.rank), p["lora_b"].reshape(lora.rank, -1))
    ref_loss, ref_tokens, ref_grads = TorchTrainReference(cfg, tensors, lora=adapters,
                                                          scale=lora.scale).loss_and_grads(batch)
    assert int(tokens) == ref_tokens > 0
    assert rel_err(np.asarray(loss), np.asarray(ref_loss)) <= TOL
    ours = dict(ock.flatten(jax.device_get(grads)))
    assert len(ours) == len(ref_grads) == 8 * cfg.llm.num_hidden_layers // 2 * 2   # A and B of q/k/v/o per layer
    for key, g in ours.items():
        _, _, layer, _, proj, which = key
        theirs = ref_grads[f"layers.{layer}.{torch_name[proj]}.{which}"]
        g = g.reshape(theirs.shape)
        assert np.abs(theirs).max() > 0, key
        assert rel_err(g, theirs) <= TOL, (key, rel_err(g, theirs))
