"""Activation sharding: the residual stream's layout per rules table, where the LLM constrains it, and the
decode-step regression it fixes (every layer's q/k/v/o kernels all-gathered on every token).

The two tables (``sharding/rules.py``, "The residual stream"): ``RULES`` keep the weights stationary
(residual ``[B, T, D]`` split by batch over data only, D over fsdp), ``TRAINING_RULES`` gather them
(batch over data and fsdp, D replicated). Both place parameters and the KV cache alike.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minicpmv_jax import memory_plan
from minicpmv_jax import sharding as S
from minicpmv_jax.config import minicpmv_2_6, tiny
from minicpmv_jax.qwen2 import Qwen2
from reference import rel_err

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)]
REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "sharding_report.py")


def _mesh_id(shape):
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------- the two tables


@pytest.mark.parametrize("shape, batch, inference, training", [
    ((1, 2, 4), 8, P(None, None, "fsdp"), P("fsdp", None, None)),
    ((2, 2, 2), 8, P("data", None, "fsdp"), P(("data", "fsdp"), None, None)),
    ((2, 2, 2), 1, P(None, None, "fsdp"), P(None, None, None)),       # B = 1: batch replicated
    ((1, 1, 8), 8, P(None, None, None), P(None, None, None)),         # no fsdp: Megatron, D replicated
    ((8, 1, 1), 8, P("data", None, None), P("data", None, None)),
], ids=str)
def test_residual_layout_of_the_two_tables(shape, batch, inference, training):
    residual = (batch, 5, 3584)
    assert S.logical_to_spec(S.RESIDUAL_AXES, residual, shape) == inference
    assert S.logical_to_spec(S.RESIDUAL_AXES, residual, shape, S.TRAINING_RULES) == training
    # the programs' inputs keep batch over data and fsdp in both tables
    for rules in (S.RULES, S.TRAINING_RULES):
        assert S.batch_spec((8, 5), (2, 2, 2), rules) == P(("data", "fsdp"), None)


def test_tables_differ_only_in_the_residual_rows():
    differ = {name for (name, a), (_, b) in zip(S.RULES, S.TRAINING_RULES) if a != b}
    assert differ == {"act_batch", "act_embed"}
    assert [name for name, _ in S.RULES] == [name for name, _ in S.TRAINING_RULES]
    state = memory_plan.abstract_params(minicpmv_2_6())
    for shape in [(1, 2, 4), (2, 2, 2)]:
        mesh = S.abstract_mesh(*shape)
        assert S.param_specs(state, mesh) == S.param_specs(state, mesh, S.TRAINING_RULES)
        llm = minicpmv_2_6().llm
        buffer = (8, 64, llm.num_key_value_heads, llm.head_dim)
        assert S.kv_cache_spec(buffer, mesh) == S.kv_cache_spec(buffer, mesh, S.TRAINING_RULES)


def test_override_rules():
    rules = S.override_rules(S.RULES, {"act_embed": "tensor"})
    assert dict(rules)["act_embed"] == ("tensor",) and len(rules) == len(S.RULES)
    with pytest.raises(ValueError, match=r"no rule: \['act_embd'\]"):
        S.override_rules(S.RULES, {"act_embd": ()})


# --------------------------------------------------------------------------- where the LLM constrains


@pytest.fixture(scope="module")
def llm_small():
    """The tiny Qwen2 (3 layers, D 128) with a vocabulary of 1022 = 2 × 511 (like the real one, not divisible
    by 4 or 8: the embedding falls back to a D split), float32 random weights filled from numpy (the eager
    init compiles a program per shape)."""
    cfg = dataclasses.replace(tiny().llm, vocab_size=1022)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        scale = shape[0] ** -0.5 if len(shape) >= 2 else 0.1
        var.set_value(jnp.asarray(rng.standard_normal(shape, np.float32) * scale + (len(shape) == 1)))
    return nnx.merge(graphdef, state)


def _constraints(closed_jaxpr) -> list[NamedSharding]:
    """Shardings of every ``sharding_constraint`` in a jaxpr and its sub-jaxprs (remat, jit, ...)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                found.append(eqn.params["sharding"])
        for sub in jcore.subjaxprs(jaxpr):
            walk(sub)

    walk(closed_jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_residual_constrained_after_embedding_and_every_layer(llm_small, remat):
    llm = llm_small
    ids, mask = jnp.zeros((8, 5), jnp.int32), jnp.ones((8, 5), bool)
    mesh = S.make_mesh(1, 2, 4)

    def traced():   # the model is merged inside the trace, as in the compiled programs
        graphdef, state = nnx.split(llm)
        return _constraints(jax.make_jaxpr(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, ids, mask))

    try:
        llm.remat = remat
        assert traced() == []                                                      # no context: none
        with S.use_mesh(None):
            assert traced() == []
        for rules, spec in [(S.RULES, P(None, None, "fsdp")), (S.TRAINING_RULES, P("fsdp", None, None))]:
            with S.use_mesh(mesh, rules):
                assert traced() == [NamedSharding(mesh, spec)] * (llm.config.num_hidden_layers + 1), rules
            with S.use_mesh(mesh), S.use_rules(rules):                              # rules alone switch
                assert traced() == [NamedSharding(mesh, spec)] * (llm.config.num_hidden_layers + 1), rules
        assert traced() == []                                                      # the context ended
        assert not hasattr(llm, "mesh") and not hasattr(llm, "rules")              # context, not state
    finally:
        llm.remat = False
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh or None, got tuple"):
        S.use_mesh((1, 2, 4))


def _loss_and_grads(model, ids, mask, weights):
    """A training-style scalar (weighted log-probabilities) and its gradient for every parameter."""
    def loss(state, graphdef):
        logits = nnx.merge(graphdef, state)(ids, mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., :3] * weights)

    graphdef, state = nnx.split(model)
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, graphdef)
    return np.float32(value), {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def train_batch_and_reference(llm_small):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, llm_small.config.vocab_size, (8, 7)).astype(np.int32)
    mask = np.ones((8, 7), bool)
    mask[2, :4] = False                                                   # left padding
    weights = rng.standard_normal((8, 7, 3)).astype(np.float32)
    return (ids, mask, weights), _loss_and_grads(llm_small, ids, mask, weights)


@pytest.mark.parametrize("rules", ["RULES", "TRAINING_RULES"])
def test_remat_training_gradients_sharded_equal_unsharded(llm_small, train_batch_and_reference, rules):
    """A training-style step (remat, no cache) with the residual constraints on (1, 2, 4): loss and every
    gradient equal to the unsharded ones (float32)."""
    batch, (ref_value, ref_grads) = train_batch_and_reference
    mesh = S.make_mesh(1, 2, 4)
    graphdef, state = nnx.split(llm_small)
    sharded = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))      # new Variables, same arrays
    sharded.remat = True
    S.shard_model(sharded, mesh)
    with S.use_mesh(mesh, getattr(S, rules)):
        value, grads = _loss_and_grads(sharded, *batch)
    assert rel_err(value, ref_value) <= 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 12 + 3
    for path, g in grads.items():
        assert rel_err(g, ref_grads[path]) <= 1e-5, path


# --------------------------------------------------------------------------- the decode-step regression


@pytest.fixture(scope="module")
def report():
    """``benchmarks/sharding_report.py`` as a module: its decode-step compile and HLO collective parser."""
    spec = importlib.util.spec_from_file_location("sharding_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _weight_collectives(report, shape, batch, rules, quantization=None):
    """Collectives of the compiled decode step (tiny widths, one layer) that move a parameter."""
    llm = dataclasses.replace(tiny().llm, num_hidden_layers=1)
    compiled = report.compile_decode_step(llm, S.make_mesh(*shape), batch, 64, rules, quantization=quantization)
    return [op for op in report.collectives(compiled.as_text(), 8) if op.weight]


@pytest.mark.parametrize("shape", MESHES, ids=_mesh_id)
def test_decode_step_moves_no_weight(report, shape):
    """With the default rules no decode step all-gathers (or otherwise moves) a parameter, on any mesh, at
    B = 1 and 8. Without the residual constraints XLA all-gathered the q/k/v/o kernels of every layer on
    (1, 2, 4) at B = 8 (benchmarks/RESULTS.md): this test fails if that comes back."""
    for batch in (1, 8):
        moved = _weight_collectives(report, shape, batch, S.RULES)
        assert moved == [], (shape, batch, [(op.kind, op.shapes, op.weight) for op in moved])


@pytest.mark.parametrize("shape", MESHES, ids=_mesh_id)
def test_quantized_decode_step_moves_no_weight(report, shape):
    """The same with int8 and int4 projections: the integer kernels and their scales stay where the rules
    put them (a scale split with its output channels) at B = 8, the batch that once gathered kernels."""
    from minicpmv_jax.quantization import QuantizationConfig

    for mode in ("int8", "int4"):
        moved = _weight_collectives(report, shape, 8, S.RULES, QuantizationConfig(mode))
        assert moved == [], (shape, mode, [(op.kind, op.shapes, op.weight) for op in moved])


def test_training_rules_gather_the_kernels_in_decode(report):
    """The counter sees weight gathers when they happen: TRAINING_RULES (batch over fsdp, D replicated)
    gather every fsdp-split kernel — the right layout for large B·T, the wrong one for decode."""
    moved = _weight_collectives(report, (1, 2, 4), 8, S.TRAINING_RULES)
    assert {op.kind for op in moved} == {"all-gather"}
    kernels = {op.weight for op in moved}
    assert {f"layers.i.attn.{p}.kernel" for p in "qkvo"} <= kernels, kernels
    assert {f"layers.i.mlp.{p}.kernel" for p in ("gate", "up", "down")} <= kernels, kernels
