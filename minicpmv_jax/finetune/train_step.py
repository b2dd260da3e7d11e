"""The compiled train and eval steps of a fine-tuning run, sharded with the rules of :mod:`minicpmv_jax.sharding`.

:class:`Trainer` holds one model split for one :class:`~minicpmv_jax.finetune.config.TrainConfig` (the
graph definition is static, the frozen parameters are data that every step reads) and the two jitted
programs. The loop is the caller's (``minicpmv-jax finetune`` is one)::

    model = MiniCPMV.from_pretrained(path, dtype="bfloat16", mesh=sharding.make_mesh(fsdp=-1))
    trainer = Trainer(model, TrainConfig(lora=LoRAConfig(rank=16), total_steps=1000))
    state = trainer.init_state()
    for host_batches in ...:                       # grad_accum_steps host batches per step
        state, metrics = trainer.train_step(state, trainer.put_batch(host_batches))
    tuned = trainer.model(state)                   # a MiniCPMV with the trained parameters

A step (:func:`train_step`) scans over the micro-batches, summing the loss sums, target-token counts and
the gradients of the loss *sums* (float32, laid out like the parameters); divides once by the step's
token count; clips by global norm; applies AdamW. Only the trainable parameters are differentiated.
A model loaded with ``quantize=`` (QLoRA) trains the same way: its integer kernels are frozen parameters
like the others, read by the quantized products of the forward and never differentiated.
The forward is the model's own (:meth:`MiniCPMV.hidden_states <minicpmv_jax.model.MiniCPMVModel.hidden_states>`:
the computation of ``MiniCPMV.compute_logits`` up to ``lm_head``, the same image packing and feature
scatter), with LoRA dropout on and reseeded per micro-batch from ``fold_in(fold_in(key, step), micro_batch)``;
the loss applies ``lm_head`` itself, in chunks of ``TrainConfig.loss_chunk`` positions
(:func:`~minicpmv_jax.finetune.loss.hidden_loss_sums`).

Sharding (with a mesh; default rules ``sharding.TRAINING_RULES``, classic FSDP): every parameter —
trainable, frozen, and each optimizer moment, which has its parameter's layout — on the rules'
``NamedSharding`` (``embed`` over ``fsdp``, heads / MLP over ``tensor``); the token arrays and the LLM's
residual stream split along the batch (``data``, then ``fsdp``), so XLA gathers each layer's weights
where they are used; the encoder inputs, counters and RNG replicated; explicit ``in_shardings`` /
``out_shardings``, the train state donated. Without a mesh everything runs on the default device.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minicpmv_jax import sharding
from minicpmv_jax import model as model_lib

from .config import TrainConfig
from .device_batch import TrainBatch, batch_shardings, pack_batches, put_batch
from .lora import LoRAEinsum, reseed_lora_dropout, set_lora_dropout
from .loss import hidden_loss_sums, mean_loss
from .optim import make_optimizer
from .train_state import TrainState, model_quantization, params_state, params_tree, prepare_model, split_model

__all__ = ["Trainer", "step_key", "micro_batch_loss", "accumulate_gradients", "train_step", "eval_step"]


# --------------------------------------------------------------------------- pure steps


def micro_batch_loss(model: model_lib.MiniCPMVModel, ids: jax.Array, mask: jax.Array, targets: jax.Array,
                     images, loss_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss sum, target-token count) of one micro-batch ``[B, L]`` (call under jit / grad).

    The model's hidden states, then ``lm_head`` and the cross-entropy in chunks of ``loss_chunk`` positions
    (:func:`~minicpmv_jax.finetune.loss.hidden_loss_sums`). An ``lm_head`` with LoRA dropout draws a mask per
    call, so it is never chunked.
    """
    head = model.llm.lm_head
    if isinstance(head, LoRAEinsum) and head.dropout is not None and not head.dropout.deterministic:
        loss_chunk = None
    return hidden_loss_sums(model.hidden_states(ids, mask, images), model.llm.logits, ids, targets, loss_chunk)


def step_key(state: TrainState) -> jax.Array:
    """The random key of ``state``'s next update (LoRA dropout): its seed folded with its step."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _micro_batches(batch: TrainBatch) -> tuple:
    """The scanned arrays of a batch: (ids, attention mask, loss mask, images) with the leading A axis."""
    return batch.input_ids, batch.attention_mask, batch.loss_mask, batch.images


def _micro_loss(params, frozen, rest, micro, key, *, graphdef, paths, dropout: bool, loss_chunk: int | None = None):
    """(loss sum, token count) of one micro-batch as a function of the trainable parameters."""
    model = nnx.merge(graphdef, params_state(params, paths), frozen, rest, copy=True)   # Variables of this trace
    if dropout:
        set_lora_dropout(model, True)
        reseed_lora_dropout(model, key)
    ids, mask, targets, images = micro
    return micro_batch_loss(model, ids, mask, targets, images, loss_chunk)


def accumulate_gradients(params, frozen: nnx.State, rest: nnx.State, batch: TrainBatch, key: jax.Array | None, *,
                         graphdef, paths, dropout: bool, grad_shardings=None, loss_chunk: int | None = None
                         ) -> tuple[Any, jax.Array, jax.Array]:
    """Gradient of the step's mean loss over all micro-batches of ``batch`` (pure).

    Scans the micro-batches, adding up their loss sums, target-token counts and the gradients of their
    loss sums (float32), then divides both by the step's token count once. Micro-batch i's LoRA dropout
    uses ``fold_in(key, i)``. ``grad_shardings`` (a tree like ``params``) pins the accumulator to the
    parameters' layout, so it is split like them instead of wherever XLA would put it. ``loss_chunk``: see
    :func:`micro_batch_loss`. Returns ``(grads like params, mean loss, token count)``.
    """
    def pin(tree):
        return tree if grad_shardings is None else jax.lax.with_sharding_constraint(tree, grad_shardings)

    loss_and_grad = jax.value_and_grad(
        functools.partial(_micro_loss, graphdef=graphdef, paths=paths, dropout=dropout, loss_chunk=loss_chunk),
        has_aux=True)

    def accumulate(carry, xs):
        grads, total, count = carry
        micro, index = xs
        micro_key = None if key is None else jax.random.fold_in(key, index)
        (micro_total, micro_count), micro_grads = loss_and_grad(params, frozen, rest, micro, micro_key)
        grads = pin(jax.tree.map(lambda g, m: g + m.astype(jnp.float32), grads, micro_grads))
        return (grads, total + micro_total, count + micro_count), None

    zeros = pin(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    xs = (_micro_batches(batch), jnp.arange(batch.input_ids.shape[0]))
    (grads, total, count), _ = jax.lax.scan(accumulate, carry, xs)
    denominator = jnp.maximum(count, 1).astype(jnp.float32)
    return jax.tree.map(lambda g: g / denominator, grads), mean_loss(total, count), count


def train_step(state: TrainState, frozen: nnx.State, rest: nnx.State, batch: TrainBatch, *, graphdef, paths,
               tx: optax.GradientTransformation, schedule, dropout: bool, grad_shardings=None,
               loss_chunk: int | None = None) -> tuple[TrainState, dict]:
    """One optimizer update over the micro-batches of ``batch`` (pure; :class:`Trainer` jits it).

    Returns the new state and metrics: ``loss`` (mean over the step's target tokens), ``tokens``,
    ``grad_norm`` (before clipping) and ``learning_rate`` (of this update).
    """
    grads, loss, count = accumulate_gradients(state.params, frozen, rest, batch, step_key(state), graphdef=graphdef,
                                              paths=paths, dropout=dropout, grad_shardings=grad_shardings,
                                              loss_chunk=loss_chunk)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           opt_state=opt_state, rng=state.rng)
    metrics = {"loss": loss, "tokens": count, "grad_norm": optax.global_norm(grads),   # float32: accumulated in float32
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32)}
    return new_state, metrics


def eval_step(params, frozen: nnx.State, rest: nnx.State, batch: TrainBatch, *, graphdef, paths,
              loss_chunk: int | None = None) -> dict:
    """Loss of ``batch`` without dropout: ``loss_sum``, ``tokens`` and their ratio ``loss`` (pure).

    Sum ``loss_sum`` and ``tokens`` over an evaluation set and divide once for its exact mean loss.
    """
    def one(carry, micro):
        micro_total, micro_count = _micro_loss(params, frozen, rest, micro, None, graphdef=graphdef, paths=paths,
                                               dropout=False, loss_chunk=loss_chunk)
        return (carry[0] + micro_total, carry[1] + micro_count), None

    (total, count), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                                     _micro_batches(batch))
    return {"loss": mean_loss(total, count), "loss_sum": total, "tokens": count}


# --------------------------------------------------------------------------- the compiled programs

# Jitted programs by (kind, graphdef, trainable paths, config, mesh, batch shapes), least recently used last.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_MAX_PROGRAMS = 32


def _traced_in(context: sharding.ShardingContext, fn):
    """``fn`` run (hence traced) inside the sharding ``context``: the residual stream of the training
    forward is constrained on the trainer's mesh per its rules."""
    def traced(*args):
        with sharding.use_mesh(context):
            return fn(*args)
    return traced


class Trainer:
    """A model readied for one :class:`TrainConfig`, its optimizer and the jitted (sharded) steps.

    Construction prepares ``model`` in place (LoRA adapters, computation dtype, remat; see
    :func:`~minicpmv_jax.finetune.train_state.prepare_model`), places its parameters on ``mesh`` (default:
    the mesh the model was loaded onto, ``model.mesh``) with ``rules`` (default ``sharding.TRAINING_RULES``:
    parameters as for inference, activations split by batch) and splits it. The model then belongs to the
    trainer: its trainable arrays seed :meth:`init_state`; use :meth:`model` for a model with trained
    parameters.

    Attributes:
      config, mesh, graphdef: as given / derived.
      frozen, rest: the frozen parameters and the other variables (read by every step, never changed).
      paths: NNX paths of the trainable parameters.
      lora_targets: module paths that got adapters (empty for full fine-tuning).
      quantization: the weight-only quantization of the model's base projections (``from_pretrained(...,
        quantize=)``; QLoRA), or None. Its integer kernels are frozen; full fine-tuning of such a model is
        refused with an ``ArgumentError``.
      tx, schedule: the optax transformation and the learning-rate schedule.
    """

    def __init__(self, model: nnx.Module, config: TrainConfig, *, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.Rules = sharding.TRAINING_RULES):
        self.config = config
        self.model_config = model.config
        self.mesh = mesh if mesh is not None else getattr(model, "mesh", None)
        self.rules = sharding.check_rules(rules)
        self._programs: dict = {}        # (kind, batch shapes) → this trainer's programs, also in _PROGRAMS
        self.quantization = model_quantization(model)
        self.lora_targets = prepare_model(model, config)
        if self.mesh is not None:
            model.shard(self.mesh, self.rules)      # the adapters too (the activations: _traced_in)
        self.graphdef, trainable, self.frozen, self.rest = split_model(model, config)
        self.paths = [path for path, _ in nnx.to_flat_state(trainable)]
        self._param_shardings = None
        if self.mesh is not None:
            self._param_shardings = params_tree(sharding.param_shardings(trainable, self.mesh, self.rules))
        self._initial = params_tree(trainable)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), self._initial)
        self.tx, self.schedule = make_optimizer(config, abstract)
        self._abstract_params = abstract
        self._dropout = config.lora is not None and config.lora.dropout > 0

    # ------------------------------------------------------------------ shardings

    def _replicated(self):
        return NamedSharding(self.mesh, PartitionSpec())

    def state_shardings(self) -> TrainState | None:
        """A :class:`TrainState` of ``NamedSharding`` (None without a mesh): each moment like its parameter."""
        if self.mesh is None:
            return None
        replicated = self._replicated()
        opt_abstract = jax.eval_shape(self.tx.init, self._abstract_params)
        opt = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, self._param_shardings,
                                    transform_non_params=lambda _: replicated)
        return TrainState(step=replicated, params=self._param_shardings, opt_state=opt, rng=replicated)

    def abstract_state(self) -> TrainState:
        """The train state as ``jax.ShapeDtypeStruct`` leaves carrying their shardings (restore target)."""
        shapes = jax.eval_shape(self._fresh_state, self._abstract_params)
        shardings = self.state_shardings()
        if shardings is None:
            return shapes
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def _fresh_state(self, params) -> TrainState:
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          rng=jax.random.key_data(jax.random.key(self.config.seed)))

    def init_state(self) -> TrainState:
        """Step 0: the model's trainable parameters as float32 masters, a fresh optimizer state, the seed's
        key. Consumes the trainer's reference to the model's initial values (call it once)."""
        if self._initial is None:
            raise RuntimeError("Trainer.init_state() was already called (or a checkpoint restored); keep the "
                               "state it returned, or build a new Trainer")
        # Committed to its devices, like a restored state: both then share the compiled step.
        placement = self.state_shardings() or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        init = jax.jit(self._fresh_state, out_shardings=placement)
        state = init(self._initial)
        self._initial = None
        return state

    def drop_initial_params(self) -> None:
        """Releases the model's initial trainable values (after restoring a checkpoint instead of
        :meth:`init_state`), so they do not stay in memory."""
        self._initial = None

    # ------------------------------------------------------------------ batches and steps

    def pack(self, host_batches: Sequence[Mapping[str, Any]]) -> TrainBatch:
        """Host micro-batches → a host :class:`TrainBatch` (``grad_accum_steps`` of them for a train step)."""
        return pack_batches(host_batches, self.model_config)

    def put_batch(self, host_batches: Sequence[Mapping[str, Any]] | TrainBatch) -> TrainBatch:
        """Host micro-batches (or a packed :class:`TrainBatch`) on the trainer's devices."""
        batch = host_batches if isinstance(host_batches, TrainBatch) else self.pack(host_batches)
        return put_batch(batch, self.mesh, self.rules)

    def _batch_key(self, batch: TrainBatch) -> tuple:
        return (batch.images is None,) + tuple(np.shape(x) for x in jax.tree.leaves(batch))

    def train_step(self, state: TrainState, batch: TrainBatch) -> tuple[TrainState, dict]:
        """One optimizer update (``state`` is donated: use the returned one). ``batch`` must hold
        ``config.grad_accum_steps`` micro-batches. Compiles once per batch shape."""
        if batch.num_micro_batches != self.config.grad_accum_steps:
            raise ValueError(f"the batch holds {batch.num_micro_batches} micro-batches, TrainConfig.grad_accum_steps "
                             f"is {self.config.grad_accum_steps}")
        return self._program("train", batch)(state, self.frozen, self.rest, batch)

    def eval_step(self, state: TrainState, batch: TrainBatch) -> dict:
        """``{"loss", "loss_sum", "tokens"}`` of ``batch`` (any number of micro-batches), no dropout."""
        return self._program("eval", batch)(state.params, self.frozen, self.rest, batch)

    def gradients(self, state: TrainState, batch: TrainBatch) -> tuple[Any, jax.Array, jax.Array]:
        """``(grads, loss, tokens)`` that :meth:`train_step` would apply to ``state`` (no update; for
        inspection and tests). ``grads`` is laid out like ``state.params``."""
        return self._program("grads", batch)(state.params, self.frozen, self.rest, batch, step_key(state))

    def _program(self, kind: str, batch: TrainBatch):
        """The jitted ``kind`` program for this batch shape. Programs are shared by every trainer with the
        same graph, trainable paths, config and mesh (a resumed run's fresh trainer compiles nothing)."""
        own = (kind, self._batch_key(batch))
        if own in self._programs:        # every step: no hash of the graph definition (ms on the 8B model)
            return self._programs[own]
        key = (kind, self.graphdef, tuple(self.paths), self.config, self.mesh, self.rules, own[1])
        if key in _PROGRAMS:
            _PROGRAMS.move_to_end(key)
            self._programs[own] = _PROGRAMS[key]
            return self._programs[own]
        common = dict(graphdef=self.graphdef, paths=self.paths, loss_chunk=self.config.loss_chunk)
        params, replicated = self._param_shardings, None
        if self.mesh is not None:
            replicated = self._replicated()
            inputs = (self._frozen_shardings(), self._rest_shardings(), batch_shardings(batch, self.mesh, self.rules))
        if kind == "train":
            fn = functools.partial(train_step, tx=self.tx, schedule=self.schedule, dropout=self._dropout,
                                   grad_shardings=params, **common)
            state = self.state_shardings()
            shardings = None if self.mesh is None else ((state, *inputs), (state, replicated))
        elif kind == "eval":
            fn = functools.partial(eval_step, **common)
            shardings = None if self.mesh is None else ((params, *inputs), replicated)
        else:
            fn = functools.partial(accumulate_gradients, dropout=self._dropout, grad_shardings=params, **common)
            shardings = None if self.mesh is None else ((params, *inputs, replicated), (params, replicated, replicated))
        kwargs = {} if shardings is None else dict(in_shardings=shardings[0], out_shardings=shardings[1])
        fn = _traced_in(sharding.ShardingContext(self.mesh, self.rules), fn)
        _PROGRAMS[key] = jax.jit(fn, donate_argnums=(0,) if kind == "train" else (), **kwargs)
        self._programs[own] = _PROGRAMS[key]
        while len(_PROGRAMS) > _MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
        return self._programs[own]

    def _frozen_shardings(self):
        return sharding.param_shardings(self.frozen, self.mesh, self.rules)

    def _rest_shardings(self):
        return jax.tree.map(lambda _: self._replicated(), self.rest)

    # ------------------------------------------------------------------ results

    def model(self, state: TrainState, dtype: Any = None) -> nnx.Module:
        """A model with ``state``'s trained parameters (float32, or cast to ``dtype``) and the frozen ones
        (shared, not copied); LoRA adapters stay separate (``lora.merge_lora`` folds them), dropout off."""
        params = state.params if dtype is None else jax.tree.map(lambda p: p.astype(dtype), state.params)
        model = nnx.merge(self.graphdef, params_state(params, self.paths), self.frozen, self.rest, copy=True)
        set_lora_dropout(model, False)
        return model
