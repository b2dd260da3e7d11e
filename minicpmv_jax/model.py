"""``MiniCPMVModel``: the whole model, loading from a checkpoint folder and the full forward pass.

Users hold :class:`minicpmv_jax.MiniCPMV`, this model plus ``chat()`` (defined with chat, in the layer above
generation: this file imports neither).

The module is a thin holder of the towers' parameters; the compiled programs take its NNX state as
data and its graph definition as a static argument (small HLO, fast compiles, no recompiles when the
weights change). :meth:`MiniCPMVModel.compute_logits` pads a host batch to buckets and runs those programs;
the computation itself is :meth:`MiniCPMVModel.forward` (:meth:`~MiniCPMVModel.hidden_states`, then ``lm_head``),
plain traced code that fine-tuning calls inside its own jitted, differentiated step.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minicpmv_jax import sharding

from . import checkpoint_names as names
from . import orbax_checkpoint
from .buckets import pad_left
from .config import MiniCPMVConfig
from .dtypes import as_dtype
from .hf_checkpoint import CheckpointError  # noqa: F401 (re-exported)
from .host import fetch, put
from .hub import resolve_model
from .image_inputs import ImageInputs, batch_image_inputs, place_features
from .quantization import QuantizationConfig, as_quantization
from .qwen2 import Qwen2
from .resampler import Resampler
from .vision import VisionEncoder

class PackedImages(NamedTuple):
    """The packed image pieces of one batch, as :meth:`MiniCPMVModel.forward` reads them (any object with these
    attributes will do, e.g. fine-tuning's ``ImageArrays``; host packing: ``build_image_inputs``).

    Shape letters as in ``layers.py``: N pieces, P patches, C patch channels, Q resampler queries.
    """

    patches: jax.Array        # float32 [N, P, C], zeros where padded
    pos_ids: jax.Array        # int32 [N, P] position-table ids
    valid: jax.Array          # bool [N, P], False for padding patches and pieces
    tgt_sizes: jax.Array      # int32 [N, 2] patch grid (rows, cols), 0×0 for padding pieces
    feature_index: jax.Array  # int32 [B, T] row of the flattened features [N·Q, D] per token slot, or −1


class MiniCPMVModel(nnx.Module):
    """MiniCPM-V 2.6: parameters, loading and the forward pass. Build with :meth:`from_pretrained`;
    ``MiniCPMVModel(cfg, rngs=...)`` gives random weights. :class:`minicpmv_jax.MiniCPMV` adds ``chat``.

    No mesh or rules are stored: the parameters carry their shardings (:attr:`mesh` reads them back), and
    the compiled programs are traced in a sharding context built from that mesh and the rules of the
    caller's context (:mod:`minicpmv_jax.sharding.context`).
    """

    def __init__(self, config: MiniCPMVConfig, *, dtype=jnp.bfloat16, param_dtype=None, rngs: nnx.Rngs,
                 attention: str = "auto", quantize: str | QuantizationConfig | None = None):
        self.config = config
        self.dtype = as_dtype(dtype)
        self.param_dtype = as_dtype(param_dtype if param_dtype is not None else dtype, "param_dtype")
        #: The language model's weight-only quantization (None: its projections are in ``param_dtype``).
        self.quantization = as_quantization(quantize)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        self.llm = Qwen2(config.llm, **common, attention=attention, quantization=self.quantization)
        self.vpm = VisionEncoder(config, **common)
        self.resampler = Resampler(config.resampler, **common)

    @property
    def mesh(self) -> jax.sharding.Mesh | None:
        """The mesh the parameters live on (:meth:`from_pretrained` with ``mesh=``, :meth:`shard`), read from
        the token embedding's sharding; None on a single device."""
        value = self.llm.embed_tokens.embedding.get_value()
        if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
            return None          # abstract (eval_shape) or traced: nothing placed to read
        placed = value.sharding
        return placed.mesh if isinstance(placed, jax.sharding.NamedSharding) else None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = "bfloat16", mesh=None, *,
                        param_dtype: Any = None, rules: sharding.Rules = sharding.RULES,
                        attention: str = "auto", quantize: str | QuantizationConfig | None = None
                        ) -> "MiniCPMVModel":
        """Loads an HF-format checkpoint folder (single or sharded safetensors) or a folder written by
        ``minicpmv-jax convert`` (an Orbax restore, see :mod:`minicpmv_jax.orbax_checkpoint`).

        ``path`` is a folder (``~`` is expanded), ``"demo"`` (a tiny random-weight model built once, for
        trying the pipeline offline: its answers are noise) or a Hugging Face Hub id such as
        ``"openbmb/MiniCPM-V-2_6"`` (its converted folder if ``minicpmv-jax`` converted it before, else
        its HF files, downloaded with the ``hub`` extra); see :func:`minicpmv_jax.hub.resolve_model`.

        ``dtype`` is the computation dtype and, unless ``param_dtype`` says otherwise, the storage dtype
        of the parameters (cast from whatever the files hold). Raises ``CheckpointError`` naming the
        tensor and file for a missing, unexpected or misshapen tensor, ``ConfigError`` for a bad config.

        ``mesh`` (a ``jax.sharding.Mesh`` with axes ``data``/``fsdp``/``tensor``, see
        ``sharding.make_mesh``) places every parameter on it as the rules of :mod:`minicpmv_jax.sharding` say, loading
        each straight into its shards (on every process of a multi-host mesh). ``rules`` (default
        ``sharding.RULES``) decide the parameters' placement. ``compute_logits`` and ``chat`` then run on that
        mesh, the LLM's activations constrained by the rules of the caller's sharding context
        (``sharding.RULES`` unless inside ``with sharding.use_rules(...)``).

        ``attention`` chooses the language model's attention kernel (``"auto"``: the best available for
        the backend and phase; ``"xla"``, ``"blockwise"``, ``"cudnn"``, ``"splash"``, ``"gpu_decode"``; see
        :mod:`minicpmv_jax.attention`). ``model.llm.attention`` may be changed later.

        ``quantize`` (``"int8"``, ``"int4"`` or a :class:`~minicpmv_jax.quantization.QuantizationConfig`)
        quantizes the language model's projections while loading, tensor by tensor: the float language
        model is never held whole. The vision tower and resampler stay in ``param_dtype``. A folder written
        by ``minicpmv-jax convert --quantize`` loads as it was quantized (``quantize`` may be left out, or
        must name the same scheme).
        """
        _check_mesh(mesh)
        folder = resolve_model(path)
        config = MiniCPMVConfig.from_pretrained(folder)
        converted = orbax_checkpoint.is_converted(folder)    # written by `minicpmv-jax convert`
        quantization = as_quantization(quantize)
        if converted:
            quantization = orbax_checkpoint.stored_quantization(folder, quantization)
        abstract = abstract_model(config, dtype, param_dtype, cls=cls, attention=attention, quantize=quantization)
        shardings = None if mesh is None else sharding.flat_param_shardings(abstract, mesh, rules)
        if converted:
            model = orbax_checkpoint.restore_params(folder, abstract, shardings=shardings)
        else:
            ckpt = names.open_validated(folder, config)
            model = names.load_entries(abstract, ckpt.read, names.entries(config, names.TOWERS),
                                       where=ckpt.where, shardings=shardings)
        return model

    def shard(self, mesh, rules: sharding.Rules = sharding.RULES) -> "MiniCPMVModel":
        """Moves the parameters onto ``mesh`` per ``rules`` (in place) and returns the model.

        Only the parameters move; activations follow the sharding context of each call (default
        ``sharding.RULES``, weights stationary, right for inference; ``sharding.TRAINING_RULES`` split the
        batch over fsdp and gather weights). Both tables place parameters alike.
        """
        _check_mesh(mesh, required=True)
        sharding.shard_model(self, mesh, rules)
        return self

    # ------------------------------------------------------------------ placement of inputs and outputs

    def put(self, x: Any, batch_axis: bool = True) -> jax.Array:
        """A host array on this model's devices (see :func:`minicpmv_jax.host.put`)."""
        return put(x, self.mesh, batch_axis)

    # ------------------------------------------------------------------ forward

    def compute_logits(self, batch: Mapping[str, Any]) -> jax.Array:
        """Full forward without a cache: ``batch`` as the processor returns it → float32 [B, L, V].

        Every image piece is encoded (SigLIP), resampled to Q features and written into its ``<unk>``
        span of ``image_bound``; then the LLM runs on the embeddings. Lengths, batch sizes, piece
        counts and patch counts are padded internally to buckets so that varied batches reuse compiled
        programs; the result has the batch's own shape.
        """
        ids = np.asarray(batch["input_ids"])
        mask = np.asarray(batch["attention_mask"]) if "attention_mask" in batch else np.ones_like(ids, bool)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids must be [B, L] and attention_mask the same shape, got "
                             f"{ids.shape} and {mask.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.llm.vocab_size):
            raise ValueError(f"input_ids outside [0, {self.config.llm.vocab_size})")
        b = ids.shape[0]
        padded = pad_left(ids, mask.astype(bool))
        offset = padded.offset
        images = self._image_inputs(batch, padded.ids.shape, [offset] * b)
        graphdef, state = nnx.split(self)
        packed = None
        if images is not None:
            vision = [self.put(a, batch_axis=False) for a in (images.patches, images.pos_ids, images.valid,
                                                              images.tgt_sizes)]
            packed = PackedImages(*vision, self.put(images.feature_index))
        logits = _logits(graphdef, state, self.put(padded.ids), self.put(padded.mask), packed,
                         context=sharding.context_for(self.mesh))
        if not logits.is_fully_addressable:  # multi-host: every process gets the whole result
            return fetch(logits)[:b, offset:]
        return logits[:b, offset:]

    def _image_inputs(self, batch: Mapping[str, Any], shape: tuple[int, int],
                      offsets: list[int]) -> ImageInputs | None:
        """The batch's pieces packed for the vision tower, or None for a text-only batch."""
        return batch_image_inputs(batch, shape, offsets, self.config)

    def encode_images(self, patches: jax.Array, pos_ids: jax.Array, valid: jax.Array,
                      tgt_sizes: jax.Array) -> jax.Array:
        """Packed pieces (see :class:`ImageInputs`) → resampled features ``[N, Q, D]`` (call under jit)."""
        return self.resampler(self.vpm(patches, pos_ids, valid), tgt_sizes)

    def encode_pieces_packed(self, patches, pos_ids, valid, tgt_sizes) -> jax.Array:
        """:meth:`encode_images` compiled (once per piece-count and patch-count bucket)."""
        graphdef, state = nnx.split(self)
        return _encode(graphdef, state, *(self.put(a, batch_axis=False) for a in (patches, pos_ids, valid,
                                                                                  tgt_sizes)))

    # ------------------------------------------------------------------ the traced forward (training)

    def input_embeddings(self, input_ids: jax.Array, images: PackedImages | None = None) -> jax.Array:
        """Token embeddings with every image piece's resampled features written into its span.

        Args:
          input_ids: int32 ``[B, T]``.
          images: None (text only) or the batch's packed pieces (:class:`PackedImages`, or any object with
            its five array attributes): ``patches`` float32 ``[N, P, C]``, ``pos_ids`` int32 ``[N, P]``,
            ``valid`` bool ``[N, P]``, ``tgt_sizes`` int32 ``[N, 2]``, ``feature_index`` int32 ``[B, T]``.

        Returns:
          ``[B, T, D]`` in the LLM's computation dtype.
        """
        x = self.llm.embed(input_ids)
        if images is None:
            return x
        features = self.encode_images(images.patches, images.pos_ids, images.valid, images.tgt_sizes)  # [N, Q, D]
        return place_features(x, features, images.feature_index)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array,
                      images: PackedImages | None = None) -> jax.Array:
        """The LLM's final hidden states (after the last norm), before ``lm_head``: ``[B, T, D]``.

        ``input_ids`` int32 ``[B, T]`` and ``attention_mask`` bool ``[B, T]`` are left-padded (positions
        count from each row's first valid token); ``images`` as in :meth:`input_embeddings`. Pure and
        un-jitted: call it under ``jax.jit`` / ``jax.grad`` (fine-tuning computes its loss from these,
        :mod:`minicpmv_jax.finetune.loss`). Respects ``llm.remat``; the residual stream is constrained per
        the sharding context it is traced in (``with sharding.use_mesh(mesh, rules):``).
        """
        return self.llm.final_hidden(self.input_embeddings(input_ids, images), attention_mask)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array,
                images: PackedImages | None = None) -> jax.Array:
        """Full forward without a cache, traced as is (no padding, no jit): float32 logits ``[B, T, V]``.

        Arguments as in :meth:`hidden_states`. The same computation as :meth:`compute_logits`, which pads
        a host batch to buckets, packs its images and runs this under ``jax.jit``; use ``forward`` inside
        your own jitted or differentiated function, e.g. a training loss.
        """
        return self.llm.logits(self.hidden_states(input_ids, attention_mask, images))

@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, patches, pos_ids, valid, tgt_sizes):
    return nnx.merge(graphdef, state).encode_images(patches, pos_ids, valid, tgt_sizes)


@functools.partial(jax.jit, static_argnums=0, static_argnames="context")
def _logits(graphdef, state, ids, mask, images: PackedImages | None, *, context: sharding.ShardingContext):
    with sharding.use_mesh(context):
        return nnx.merge(graphdef, state).forward(ids, mask, images)


def _check_mesh(mesh, required: bool = False) -> None:
    if (mesh is None and not required) or isinstance(mesh, jax.sharding.Mesh):
        return
    allowed = "a jax.sharding.Mesh (e.g. sharding.make_mesh(fsdp=-1))" + ("" if required else " or None")
    raise TypeError(f"mesh must be {allowed}, got {type(mesh).__name__}")


def abstract_model(config: MiniCPMVConfig, dtype: Any = "bfloat16", param_dtype: Any = None, *,
                   cls: type[MiniCPMVModel] = MiniCPMVModel, attention: str = "auto",
                   quantize: str | QuantizationConfig | None = None) -> MiniCPMVModel:
    """The model as shapes, dtypes and logical axes only (``nnx.eval_shape``: nothing allocated).

    The RNG streams are created as array refs (``nnx.var_defaults(ref=True)``; the parameters are not):
    with plain Variables, flax compares the RNG counter's ``.sharding`` on every draw, and for a tracer jax
    builds that attribute error's message by scanning the whole trace, so building the 8B model took ~9 s
    (quadratic in the number of parameters) instead of ~1.4 s.
    """
    def build() -> MiniCPMVModel:
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention,
                   quantize=quantize)

    return nnx.eval_shape(build)
