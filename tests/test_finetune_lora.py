"""LoRA pieces on their own: adapter shapes and logical axes from the einsum equation, PEFT's init, the
branch's value, merging, target selection and its errors; and a bfloat16 base with float32 adapters
(the memory-saving setup) training without touching the base; an lm_head adapter with dropout (never
chunked)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import text_batch, train_config
from minicpmv_jax import MiniCPMV
from minicpmv_jax.finetune.config import LoRAConfig, TrainConfig, first_match
from minicpmv_jax.finetune.lora import (LoRAEinsum, LoRAParam, apply_lora, lora_equations, lora_modules, merge_lora,
                                        set_lora_dropout)
from minicpmv_jax.finetune.train_state import describe_trainable
from minicpmv_jax.finetune.train_step import Trainer
from minicpmv_jax.layers import Einsum
from minicpmv_jax.testing.checkpoint import write_checkpoint
from reference import rel_err


def test_equations_follow_the_kernel_layout():
    assert lora_equations("BTD,DNH->BTNH") == ("BTD,Dr->BTr", "BTr,rNH->BTNH", "Dr,rNH->DNH", (0,), (1, 2))
    assert lora_equations("BTNH,NHD->BTD") == ("BTNH,NHr->BTr", "BTr,rD->BTD", "NHr,rD->NHD", (0, 1), (2,))
    assert lora_equations("QD,DNH->QNH")[:2] == ("QD,Dr->Qr", "Qr,rNH->QNH")          # resampler queries
    with pytest.raises(ValueError, match="already uses the letter 'r'"):
        lora_equations("BTr,rD->BTD")
    with pytest.raises(ValueError, match="expected '<input>,<kernel>-><output>'"):
        lora_equations("BTD->BTD")


@pytest.mark.parametrize("equation, shape, axes", [
    ("BTD,DNH->BTNH", (12, 3, 5), ("embed", "heads", "head_dim")),
    ("BTNH,NHD->BTD", (3, 5, 12), ("heads", "head_dim", "embed")),
])
def test_adapter_shapes_axes_init_and_value(equation, shape, axes):
    base = Einsum(equation, shape, axes, rngs=nnx.Rngs(0), fan_in=tuple(range(len(shape) - 1)))
    lora = LoRAEinsum(base, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    _, _, _, ins, outs = lora_equations(equation)
    a, b = lora.lora_a, lora.lora_b
    assert isinstance(a, LoRAParam) and isinstance(a, nnx.Param)
    assert a.get_value().shape == tuple(shape[i] for i in ins) + (4,)
    assert b.get_value().shape == (4,) + tuple(shape[i] for i in outs)
    assert a.get_metadata()["out_sharding"] == tuple(axes[i] for i in ins) + ("lora_rank",)
    assert b.get_metadata()["out_sharding"] == ("lora_rank",) + tuple(axes[i] for i in outs)
    bound = 1 / math.sqrt(math.prod(shape[i] for i in ins))                      # kaiming-uniform(a=√5)
    assert np.abs(a.get_value()).max() <= bound and np.abs(a.get_value()).max() > 0.8 * bound
    assert a.get_value().dtype == b.get_value().dtype == jnp.float32 and not np.any(b.get_value())

    x = jax.random.normal(jax.random.key(2), (2, 7) + tuple(shape[i] for i in ins))
    np.testing.assert_array_equal(lora(x), base(x))                               # B = 0: no change yet
    b.set_value(jax.random.normal(jax.random.key(3), b.get_value().shape))
    w = np.asarray(base.kernel.get_value(), np.float64)
    delta = np.einsum(lora.eq_merge, np.asarray(a.get_value(), np.float64), np.asarray(b.get_value(), np.float64))
    expected = np.einsum(equation, np.asarray(x, np.float64), w + 2.0 * delta)     # alpha / rank = 2
    assert rel_err(np.asarray(lora(x)), expected) <= 1e-5


def test_apply_and_merge_on_the_model(tmp_path):
    write_checkpoint(tmp_path, train_config(), seed=3, num_shards=1, tokenizer=False)
    model = MiniCPMV.from_pretrained(tmp_path, dtype="float32")
    kernel_before = np.asarray(model.llm.layers[1].attn.o.kernel.get_value())
    config = LoRAConfig(rank=2, alpha=3.0, target_modules=("!llm/layers/0/.*", r"llm/layers/\d+/attn/(q|o)",
                                                          r"resampler/kv_proj"))
    wrapped = apply_lora(model, config, seed=0)
    assert wrapped == ["llm/layers/1/attn/o", "llm/layers/1/attn/q", "resampler/kv_proj"]      # graph order
    assert [path for path, _ in lora_modules(model)] == [("llm", "layers", 1, "attn", "o"),
                                                         ("llm", "layers", 1, "attn", "q"), ("resampler", "kv_proj")]
    assert isinstance(model.llm.layers[0].attn.q, Einsum) and not isinstance(model.llm.layers[0].attn.q, LoRAEinsum)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, config)
    lora_o = model.llm.layers[1].attn.o
    lora_o.lora_b.set_value(jnp.full(lora_o.lora_b.get_value().shape, 0.01))
    expected = kernel_before + np.asarray(lora_o.delta())                        # scale · A·B
    assert rel_err(np.asarray(lora_o.delta()),
                   1.5 * np.einsum("NHr,rD->NHD", lora_o.lora_a.get_value(), lora_o.lora_b.get_value())) <= 1e-6
    merge_lora(model)
    assert not lora_modules(model) and isinstance(model.llm.layers[1].attn.o, Einsum)
    assert rel_err(np.asarray(model.llm.layers[1].attn.o.kernel.get_value()), expected) <= 1e-6
    with pytest.raises(ValueError, match="match no Einsum module.*llm/"):
        apply_lora(model, LoRAConfig(target_modules=("llm/layers/\\d+/attention/q",)))


def test_first_match_rules():
    rules = ("!llm/layers/0/.*", r"llm/layers/\d+/attn/(q|v)")
    assert first_match(rules, "llm/layers/3/attn/q") and first_match(rules, "llm/layers/10/attn/v")
    assert not first_match(rules, "llm/layers/0/attn/q")            # the negated rule comes first
    assert not first_match(rules, "llm/layers/3/attn/k")            # no rule matches
    assert not first_match(rules, "xllm/layers/3/attn/q")           # full matches only
    with pytest.raises(ValueError, match="not a valid regex"):
        LoRAConfig(target_modules=("llm/(",))
    with pytest.raises(ValueError, match="LoRAConfig.rank"):
        LoRAConfig(rank=0)


def test_dropout_is_off_outside_training():
    base = Einsum("BTD,DF->BTF", (6, 5), ("embed", "mlp"), rngs=nnx.Rngs(0))
    lora = LoRAEinsum(base, rank=2, alpha=2.0, dropout=0.5, rngs=nnx.Rngs(1))
    lora.lora_b.set_value(jnp.ones((2, 5)))
    x = jnp.ones((1, 3, 6))
    np.testing.assert_array_equal(lora(x), lora(x))                   # deterministic by default
    set_lora_dropout(lora, True)
    assert lora.dropout.deterministic is False
    assert not np.array_equal(np.asarray(lora(x)), np.asarray(lora(x)))


def test_bfloat16_base_with_float32_adapters_trains_only_the_adapters(tmp_path):
    write_checkpoint(tmp_path, train_config(), seed=4, num_shards=1, tokenizer=False)
    model = MiniCPMV.from_pretrained(tmp_path, dtype="bfloat16")
    config = TrainConfig(learning_rate=1e-2, total_steps=8, lora=LoRAConfig(rank=4, alpha=8.0), train_resampler=False)
    assert config.compute_dtype == "bfloat16"
    trainer = Trainer(model, config)
    frozen_before = jax.tree.map(np.asarray, jax.tree.leaves(trainer.frozen))
    assert {np.dtype(x.dtype) for x in frozen_before} == {np.dtype(jnp.bfloat16)}
    state = trainer.init_state()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert describe_trainable(state.params).startswith("16 tensors,")       # A and B of q/k/v/o × 2 layers
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    batch = trainer.put_batch([text_batch(7, 2, 32)])
    losses = []
    for _ in range(8):
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    for before, after in zip(frozen_before, jax.tree.leaves(trainer.frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))
    tuned = trainer.model(state)
    assert tuned.llm.layers[0].attn.q.base.kernel.get_value().dtype == jnp.bfloat16
    merged = merge_lora(trainer.model(state))
    assert merged.llm.layers[0].attn.q.kernel.get_value().dtype == jnp.bfloat16


def test_lm_head_adapter_with_dropout_is_never_chunked(tmp_path):
    """The chunked loss calls lm_head once per chunk, which a dropout stream cannot follow (it would draw the
    same mask for every chunk, and NNX refuses the mutation inside the scan): with dropout on an lm_head
    adapter the loss is computed at once, so any ``loss_chunk`` gives the unchunked step exactly."""
    write_checkpoint(tmp_path, train_config(), seed=5, num_shards=1, tokenizer=False)
    batch = text_batch(3, 2, 40)
    results = []
    for chunk in (None, 16):
        config = TrainConfig(compute_dtype="float32", loss_chunk=chunk,
                             lora=LoRAConfig(rank=2, dropout=0.2, target_modules=("llm/lm_head",)))
        trainer = Trainer(MiniCPMV.from_pretrained(tmp_path, dtype="float32"), config)
        assert trainer.lora_targets == ["llm/lm_head"]
        state, metrics = trainer.train_step(trainer.init_state(), trainer.put_batch([batch]))
        results.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    assert results[0] == results[1]
