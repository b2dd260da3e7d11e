"""The small pure pieces of fine-tuning: the masked loss (shift, normalisation, empty rows) and its chunked
form, the learning-rate schedule, the weight-decay mask, packing micro-batches for a step, and the configs'
JSON round trip."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import make_batch, text_batch, train_config
from minicpmv_jax import MiniCPMV
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.finetune.config import DEFAULT_DECAY, LoRAConfig, TrainConfig, first_match
from minicpmv_jax.finetune.device_batch import pack_batches
from minicpmv_jax.finetune.loss import hidden_loss_sums, loss_sums, mean_loss, token_losses
from minicpmv_jax.finetune.optim import decay_mask, learning_rate_schedule
from minicpmv_jax.finetune.train_state import params_tree


def test_loss_is_the_shifted_masked_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], bool)                 # row 1: a padding row
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [-log_p[0, t - 1, ids[0, t]] for t in (1, 2, 4)]               # logits at t−1 predict t
    total, count = loss_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    assert int(count) == 3 and float(total) == pytest.approx(sum(expected), rel=1e-6)
    assert token_losses(jnp.asarray(logits), jnp.asarray(ids)).shape == (2, 4)
    empty_total, empty_count = loss_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros((2, 5), bool))
    assert float(mean_loss(empty_total, empty_count)) == 0.0                  # no target: 0, not NaN
    with pytest.raises(ValueError, match="loss_mask"):
        loss_sums(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros((2, 4), bool))


def rel_err(a, b) -> float:
    """max |a − b| / max |b| (as ``tests/reference.py``, without importing torch)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("chunk", [1, 5, 8, 12, 36])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk):
    """Loss sum and the gradients of hidden states and lm_head kernel: chunked = all logits at once
    (T = 37; chunks that divide T, that do not, one position, and one chunk short of T)."""
    rng = np.random.default_rng(2)
    b, t, d, v = 3, 37, 11, 29
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    ids = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = rng.random((b, t)) < 0.7
    mask[2] = False                                                           # a padding row
    mask = jnp.asarray(mask)

    def loss(hidden, kernel, chunk):
        head = lambda h: jnp.einsum("BTD,DV->BTV", h, kernel)               # noqa: E731
        total, count = hidden_loss_sums(hidden, head, ids, mask, chunk)
        return total, count

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (total, count), grads = grad(hidden, kernel, chunk)
    (ref_total, ref_count), ref_grads = grad(hidden, kernel, None)
    expected, _ = loss_sums(jnp.einsum("BTD,DV->BTV", hidden, kernel), ids, mask)
    assert int(count) == int(ref_count) == int(mask[:, 1:].sum())
    assert float(ref_total) == float(expected)                                # None: exactly loss_sums
    assert rel_err(np.asarray(total), np.asarray(ref_total)) <= 1e-5
    for g, ref in zip(grads, ref_grads):
        assert rel_err(np.asarray(g), np.asarray(ref)) <= 1e-5
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        hidden_loss_sums(hidden, lambda h: h, ids, mask, 0)


def test_learning_rate_schedule():
    schedule = learning_rate_schedule(TrainConfig(learning_rate=1e-3, warmup_steps=4, total_steps=14,
                                                  end_learning_rate=1e-4))
    values = [float(schedule(s)) for s in range(16)]
    np.testing.assert_allclose(values[:5], [0, 2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(values[9], 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-6)
    np.testing.assert_allclose(values[14:], [1e-4, 1e-4], rtol=1e-6)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert float(learning_rate_schedule(TrainConfig(learning_rate=2e-3, total_steps=5))(0)) == pytest.approx(2e-3)


def test_weight_decay_skips_biases_and_norms():
    abstract = nnx.eval_shape(lambda: MiniCPMV(train_config(), rngs=nnx.Rngs(0)))
    mask = dict(ock.flatten(decay_mask(params_tree(nnx.state(abstract, nnx.Param)), DEFAULT_DECAY)))
    no_decay = sorted("/".join(k) for k, v in mask.items() if not v)
    assert all(name.endswith(("bias", "norm/weight", "scale")) or "/ln" in name or "post_ln" in name
               for name in no_decay), no_decay
    for name in ("llm/norm/weight", "llm/layers/0/input_norm/weight", "llm/layers/1/attn/q/bias",
                 "vpm/layers/0/ln1/scale", "vpm/post_ln/bias", "resampler/ln_kv/scale", "resampler/o/bias"):
        assert not mask[tuple(name.split("/"))], name
    for name in ("llm/embed_tokens/embedding", "llm/lm_head/kernel", "llm/layers/0/mlp/down/kernel",
                 "vpm/pos_embed", "resampler/query", "resampler/proj", "llm/layers/0/attn/q/lora_a"):
        assert first_match(DEFAULT_DECAY, name), name


def test_pack_stacks_micro_batches_of_different_shapes():
    cfg = train_config()
    rng = np.random.default_rng(1)
    with_image = make_batch(rng, [{"tokens": 80, "image": (3, 4)}, {"tokens": 20}], length=80)
    text = text_batch(2, 3, 40)
    packed = pack_batches([text, with_image], cfg)
    assert packed.input_ids.shape == (2, 3, 80) and packed.num_micro_batches == 2
    # The text micro-batch: 40 more columns of left padding, same ids at the right end.
    np.testing.assert_array_equal(packed.input_ids[0, :, 40:], text["input_ids"])
    assert not packed.attention_mask[0, :, :40].any() and not packed.loss_mask[0, :, :40].any()
    # Row 2 of the image micro-batch is a padding row.
    assert not packed.attention_mask[1, 2].any() and not packed.loss_mask[1, 2].any()
    assert packed.num_target_tokens == text["loss_mask"][:, 1:].sum() + with_image["loss_mask"][:, 1:].sum()
    images = packed.images
    assert images.patches.shape[:2] == (2, 1) and images.tgt_sizes[1, 0].tolist() == [3, 4]
    assert (images.feature_index[0] == -1).all() and not images.valid[0].any()       # no image in micro-batch 0
    start = int(with_image["image_bound"][0][0][0])
    np.testing.assert_array_equal(images.feature_index[1, 0, start:start + 64], np.arange(64))
    assert pack_batches([text], cfg).images is None
    with pytest.raises(ValueError, match="micro-batch 0: missing key 'loss_mask'"):
        pack_batches([{"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}], cfg)
    bad = dict(with_image, pixel_values=[[], []])
    with pytest.raises(ValueError, match="micro-batch 0: prompt 0: 1 image placeholder spans but only 0"):
        pack_batches([bad], cfg)


def test_configs_round_trip_and_validate():
    config = TrainConfig(learning_rate=3e-4, warmup_steps=10, total_steps=100, lora=LoRAConfig(rank=16, dropout=0.05),
                         train_vision=True, decay=(".*kernel",))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="TrainConfig.warmup_steps"):
        TrainConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="TrainConfig.compute_dtype"):
        TrainConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="unknown key 'learning_rat'"):
        TrainConfig.from_dict({"learning_rat": 1.0})
    with pytest.raises(ValueError, match="TrainConfig.loss_chunk"):
        TrainConfig(loss_chunk=0)
    assert TrainConfig.from_dict({"loss_chunk": None}).loss_chunk is None
