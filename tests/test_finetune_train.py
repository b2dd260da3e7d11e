"""Training behaviour on the tiny model: overfitting a 4-sample set, gradient accumulation equal to one
big batch, and the eval step (full fine-tuning); images of one size bucket sharing the compiled step with
the loss and gradients of unpadded pieces; LoRA runs with dropout and a trained resampler on an
image batch: resume from a checkpoint equal to the uninterrupted run, only adapters (and the resampler)
change, merged-model logits equal the adapter model's, and the exported folder loads with
``MiniCPMV.from_pretrained`` and gives the same logits."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import assert_same_update, make_batch, split_rows, text_batch, train_config
from minicpmv_jax import MiniCPMV
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.finetune.checkpoint import TrainCheckpointer
from minicpmv_jax.finetune.config import LoRAConfig, TrainConfig
from minicpmv_jax.finetune.device_batch import ImageArrays, TrainBatch
from minicpmv_jax.finetune.export import export_model, merged_copy
from minicpmv_jax.finetune.lora import LoRAEinsum
from minicpmv_jax.finetune.train_step import Trainer
from minicpmv_jax.image_inputs import feature_slots
from minicpmv_jax.patches import pack_pieces
from minicpmv_jax.testing.checkpoint import write_checkpoint
from reference import rel_err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_base")
    write_checkpoint(folder, train_config(), seed=21, num_shards=1, tokenizer=False)
    return str(folder)


def _load(base):
    return MiniCPMV.from_pretrained(base, dtype="float32")


def _flat(tree) -> dict:
    return dict(ock.flatten(jax.device_get(tree)))


# --------------------------------------------------------------------------- full fine-tuning


# Full fine-tuning of the LLM. Adam's first update is ~lr·sign(g); the large epsilon makes it smooth in g,
# so that rounding differences (accumulation order) cannot flip it. Both tests share this config and
# batch shape, hence one compiled step.
FULL_CONFIG = TrainConfig(learning_rate=1e-2, total_steps=40, warmup_steps=2, adam_eps=1e-3, weight_decay=0.01,
                          compute_dtype="float32", train_resampler=False)


def _four_samples() -> dict:
    return text_batch(1, 4, 40, lengths=[40, 33, 17, 38])


def test_overfits_four_samples(base):
    trainer = Trainer(_load(base), FULL_CONFIG)
    batch = trainer.put_batch([_four_samples()])
    state = trainer.init_state()
    first_eval = trainer.eval_step(state, batch)
    losses = []
    for _ in range(40):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(float(first_eval["loss"]), rel=1e-6)   # same params, no dropout
    assert int(metrics["tokens"]) == int(first_eval["tokens"]) == batch.num_target_tokens
    assert np.isfinite(losses).all()
    final = float(trainer.eval_step(state, batch)["loss"])
    assert final <= 0.1 * losses[0], (losses[0], final)
    assert int(state.step) == 40


def test_gradient_accumulation_equals_one_big_batch(base):
    """2 micro-batches of 2 rows, the second one shorter, = one step of the 4 rows."""
    big = _four_samples()
    halves = split_rows(big, 2)
    assert not halves[1]["attention_mask"][:, :2].any()
    halves[1] = {k: (v[:, 2:] if isinstance(v, np.ndarray) and v.ndim == 2 else v) for k, v in halves[1].items()}
    results = []
    for accum, micro in ((2, halves), (1, [big])):
        trainer = Trainer(_load(base), dataclasses.replace(FULL_CONFIG, grad_accum_steps=accum))
        state = trainer.init_state()
        before = _flat(state.params)
        state, metrics = trainer.train_step(state, trainer.put_batch(micro))
        results.append((before, _flat(state.params), {k: float(v) for k, v in metrics.items()}))
    (before, after_a, m_a), (_, after_b, m_b) = results
    assert m_a["tokens"] == m_b["tokens"] > 0
    for key in ("loss", "grad_norm", "learning_rate"):
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-5), key
    assert_same_update(before, after_a, before, after_b, FULL_CONFIG.learning_rate)


# --------------------------------------------------------------------------- image buckets


def _three_images(seed: int, grids: list[tuple[int, int]]) -> dict:
    rng = np.random.default_rng(seed)
    return make_batch(rng, [{"tokens": 96, "image": g, "image_at": 3 + i} for i, g in enumerate(grids)], length=96)


def _unbucketed(batch: dict, cfg) -> TrainBatch:
    """``batch`` packed with exactly its pieces and its longest piece's patches (no padding at all)."""
    pieces = [p for row in batch["pixel_values"] for p in row]
    longest = max(p.shape[1] * p.shape[2] for p in pieces) // cfg.vision.patch_size ** 2
    patches, pos_ids, valid, tgt_sizes = pack_pieces(pieces, (longest,), patch_size=cfg.vision.patch_size,
                                                     side=cfg.vision.num_patches_per_side)
    feature_index, _ = feature_slots(batch["image_bound"], [len(p) for p in batch["pixel_values"]],
                                     batch["input_ids"].shape, num_queries=cfg.resampler.num_queries)
    images = ImageArrays(*(x[None] for x in (patches, pos_ids, valid, tgt_sizes, feature_index)))
    return TrainBatch(*(batch[k][None] for k in ("input_ids", "attention_mask", "loss_mask")), images)


def test_image_sizes_of_one_bucket_share_the_compiled_step(base):
    """Three pieces of 12–30 patches and three of 9–30: both batches are padded to 4 pieces of 64 patches,
    so the step compiles once; the loss and every gradient (vision encoder and resampler trained) equal
    those of the same batch packed without padding."""
    config = TrainConfig(compute_dtype="float32", train_vision=True, train_resampler=True)
    trainer = Trainer(_load(base), config)
    state = trainer.init_state()
    cfg = trainer.model_config
    batches = [_three_images(0, [(3, 4), (2, 5), (5, 6)]), _three_images(1, [(3, 3), (6, 5), (4, 4)])]
    packed = [trainer.pack([b]) for b in batches]
    assert packed[0].images.patches.shape == packed[1].images.patches.shape == (1, 4, 64, cfg.vision.patch_dim)
    assert jax.tree.map(np.shape, packed[0]) == jax.tree.map(np.shape, packed[1])
    results = [trainer.gradients(state, trainer.put_batch(p)) for p in packed]
    program = trainer._program("grads", packed[0])
    assert program is trainer._program("grads", packed[1]) and program._cache_size() == 1
    for batch, (grads, loss, tokens) in zip(batches, results):
        exact = _unbucketed(batch, cfg)
        assert exact.images.patches.shape[1:3] == (3, 30)
        ref_grads, ref_loss, ref_tokens = trainer.gradients(state, trainer.put_batch(exact))
        assert int(tokens) == int(ref_tokens) > 0
        assert rel_err(np.asarray(loss), np.asarray(ref_loss)) <= 1e-6
        ours, ref = _flat(grads), _flat(ref_grads)
        assert {k[0] for k in ours} == {"llm", "vpm", "resampler"}
        scale = {t: max(np.abs(g).max() for k, g in ref.items() if k[0] == t) for t in ("llm", "vpm", "resampler")}
        for key, g in ref.items():
            assert np.isfinite(ours[key]).all(), key
            if key[0] != "llm" and key[-2:] == ("k", "bias"):      # exactly 0 (softmax cancels it): rounding noise
                assert np.abs(ours[key] - g).max() <= 1e-6 * scale[key[0]], key
                continue
            assert rel_err(ours[key], g) <= 1e-5, (key, rel_err(ours[key], g))


# --------------------------------------------------------------------------- LoRA: resume, merge, export


LORA_CONFIG = TrainConfig(learning_rate=2e-2, total_steps=20, compute_dtype="float32", seed=4,
                          lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1), train_resampler=True)


def _image_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return make_batch(rng, [{"tokens": 90, "image": (3, 5), "image_at": 4}, {"tokens": 60}], length=90)


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """6 LoRA steps on image batches, saved every 2 (keeping 2), with the losses of the uninterrupted run."""
    ckpt_dir = str(tmp_path_factory.mktemp("lora_ckpt"))
    trainer = Trainer(_load(base), LORA_CONFIG)
    batches = [_image_batch(s) for s in range(6)]
    state = trainer.init_state()
    losses, saved = [], []
    with TrainCheckpointer(ckpt_dir, LORA_CONFIG, base_model=base, lora_targets=trainer.lora_targets, save_every=2,
                           max_to_keep=2) as ckpt:
        for i, batch in enumerate(batches):
            state, metrics = trainer.train_step(state, trainer.put_batch([batch]))
            losses.append(float(metrics["loss"]))
            # Asynchronous: the next step donates the arrays being saved.
            saved.append(ckpt.save(state, data={"epoch": 0, "batch": i + 1}))
    return dict(trainer=trainer, state=state, losses=losses, batches=batches, ckpt_dir=ckpt_dir, saved=saved)


def test_resume_equals_the_uninterrupted_run(base, lora_run):
    """Restore step 4 into a fresh model and trainer, run steps 5–6: the same losses and parameters, bit for
    bit (the same program on the same inputs; a step's dropout key depends only on the seed and the step)."""
    assert lora_run["saved"] == [False, True, False, True, False, True]
    ckpt = TrainCheckpointer(lora_run["ckpt_dir"], LORA_CONFIG, base_model=base, save_every=2)
    assert ckpt.steps() == [4, 6]                                        # max_to_keep=2
    meta = ckpt.metadata()
    assert meta["data"] == {"epoch": 0, "batch": 6} and meta["base_model"] == os.path.abspath(base)
    assert meta["lora_targets"] == lora_run["trainer"].lora_targets and len(meta["lora_targets"]) == 8
    # Only the adapters and the resampler are in the checkpoint (not the frozen base).
    stored = ckpt.stored_params()
    resampler = nnx.to_flat_state(nnx.state(_load(base).resampler, nnx.Param))
    assert len(stored) == 2 * len(meta["lora_targets"]) + len(resampler)
    assert all(k[-1] in ("lora_a", "lora_b") or k[0] == "resampler" for k in stored)

    fresh = Trainer(_load(base), LORA_CONFIG)
    state, meta = ckpt.restore(fresh, step=4)
    assert int(state.step) == 4 and meta["data"]["batch"] == 4
    for i in range(meta["data"]["batch"], 6):
        state, metrics = fresh.train_step(state, fresh.put_batch([lora_run["batches"][i]]))
        assert float(metrics["loss"]) == lora_run["losses"][i], i
    expected = _flat(lora_run["state"].params)
    assert _flat(state.params).keys() == expected.keys()
    for key, value in _flat(state.params).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))
    with pytest.raises(RuntimeError, match="already called"):
        fresh.init_state()
    with pytest.raises(ValueError, match="TrainConfig.lora"):
        ckpt.restore(Trainer(_load(base), TrainConfig(compute_dtype="float32", lora=LoRAConfig(rank=2))))
    ckpt.close()


def test_lora_changes_only_adapters_and_merges_exactly(base, lora_run, tmp_path):
    trainer, state = lora_run["trainer"], lora_run["state"]
    tuned = trainer.model(state)
    original = dict(nnx.to_flat_state(nnx.state(_load(base), nnx.Param)))
    changed = []
    for path, var in nnx.to_flat_state(nnx.state(tuned, nnx.Param)):
        if path[-1] in ("lora_a", "lora_b"):
            continue
        base_path = tuple(p for p in path if p != "base")           # the wrapped Einsum's kernel and bias
        same = np.array_equal(np.asarray(var.get_value()), np.asarray(original[base_path].get_value()))
        if path[0] == "resampler":
            changed.append(not same)
        else:
            assert same, path                                         # frozen: bit-identical after 6 steps
    assert all(changed) and changed                                  # the resampler was trained
    assert isinstance(tuned.llm.layers[0].attn.q, LoRAEinsum)
    b = tuned.llm.layers[1].attn.v.lora_b.get_value()
    assert np.abs(np.asarray(b)).max() > 0                           # B moved away from zero

    merged = merged_copy(tuned)
    assert not any(isinstance(m, LoRAEinsum) for _, m in nnx.iter_modules(merged))
    assert isinstance(tuned.llm.layers[0].attn.q, LoRAEinsum)         # the copy, not the model, was merged
    dst = tmp_path / "exported"
    export_model(tuned, dst, base_model=base, info={"step": int(state.step)})
    manifest = json.loads((dst / ock.MANIFEST_FILE).read_text())
    assert manifest["finetune"] == {"step": 6} and "config.json" in manifest["copied_files"]
    loaded = MiniCPMV.from_pretrained(dst, dtype="float32")
    merged_params = dict(nnx.to_flat_state(nnx.state(merged, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):     # the folder holds the merged model
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(merged_params[path].get_value()))

    batch = _image_batch(99)
    mask = batch["attention_mask"]
    adapter_logits = np.asarray(tuned.compute_logits(batch))[mask]
    assert rel_err(np.asarray(loaded.compute_logits(batch))[mask], adapter_logits) <= 1e-5
    with pytest.raises(Exception, match="already exists"):
        export_model(tuned, dst, base_model=base)
