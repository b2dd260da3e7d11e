"""The public surface that fine-tuning is built on: ``minicpmv_jax.finetune``'s re-exports, the converter
helpers it reuses, ``orbax_checkpoint.write_params``, and ``MiniCPMV.forward`` / ``hidden_states`` (the
traced forward the train step differentiates) equal to ``compute_logits``."""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from minicpmv_jax import convert_weights
import minicpmv_jax.finetune as finetune
from helpers import make_batch, train_config
from minicpmv_jax import MiniCPMV
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.image_inputs import build_image_inputs
from minicpmv_jax.model import PackedImages


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", finetune.__all__)
def test_every_public_name_imports_from_the_package(name):
    namespace: dict = {}
    exec(f"from minicpmv_jax.finetune import {name}", namespace)             # noqa: S102
    value = namespace[name]
    defining = importlib.import_module(f"minicpmv_jax.finetune.{finetune._EXPORTS[name]}")
    assert value is getattr(defining, name)
    assert name in getattr(defining, "__all__", [name]), f"{name} is not in its module's __all__"
    assert (getattr(value, "__doc__", None) or "").strip(), f"{name} has no docstring"


def test_the_package_api_is_complete_and_lazy():
    for name in ("DataConfig", "FinetuneDataset", "SampleError", "SkippedSamplesWarning", "BadSample", "load_samples",
                 "TrainConfig", "LoRAConfig", "Trainer", "TrainState", "TrainCheckpointer", "export_model",
                 "merge_lora", "apply_lora", "describe_trainable", "fit", "LoopConfig", "read_log"):
        assert name in finetune.__all__, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        finetune.Nope  # noqa: B018
    # Importing the package loads none of its modules (Orbax comes with the checkpoint and export ones).
    code = ("import sys, minicpmv_jax.finetune as f; "
            "print(sorted(m for m in sys.modules if m.startswith(('minicpmv_jax.finetune.', 'orbax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_converter_helpers_are_public():
    for name in ("check_destination", "staged", "copy_aux_files"):
        assert name in convert_weights.__all__ and callable(getattr(convert_weights, name)), name
    with pytest.raises(convert_weights.ConvertError, match="already exists"):
        convert_weights.check_destination(".", "/nonexistent-source", overwrite=False)


def test_write_params_takes_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = {"llm": {"norm": {"weight": np.arange(6, dtype=np.float32).reshape(2, 3)}},
            "vpm": {"pos_embed": np.ones((5,), np.int32)}}
    written = ock.write_params("params", tree)
    assert written == str(tmp_path / "params")
    assert ock.stored_arrays("params") == {("llm", "norm", "weight"): ((2, 3), np.dtype(np.float32)),
                                           ("vpm", "pos_embed"): ((5,), np.dtype(np.int32))}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    loaded = ock.orbax_v1().load(written, abstract)
    np.testing.assert_array_equal(loaded["llm"]["norm"]["weight"], tree["llm"]["norm"]["weight"])


@pytest.fixture(scope="module")
def model():
    return MiniCPMV(train_config(), dtype="float32", rngs=nnx.Rngs(3))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask, images):
    m = nnx.merge(graphdef, state)
    return m.forward(ids, mask, images), m.llm.logits(m.hidden_states(ids, mask, images))


@pytest.mark.parametrize("with_image", [False, True])
def test_forward_equals_compute_logits(model, with_image):
    cfg = model.config
    rng = np.random.default_rng(4)
    rows = [{"tokens": 90, "image": (3, 5), "image_at": 4} if with_image else {"tokens": 90}, {"tokens": 41}]
    batch = make_batch(rng, rows, length=90)              # [2, 90]: not a bucketed shape
    images = None
    if with_image:
        packed = build_image_inputs(batch["pixel_values"], batch["image_bound"], batch["input_ids"].shape,
                                    num_queries=cfg.resampler.num_queries, patch_size=cfg.vision.patch_size,
                                    side=cfg.vision.num_patches_per_side)
        images = PackedImages(packed.patches, packed.pos_ids, packed.valid, packed.tgt_sizes, packed.feature_index)
    graphdef, state = nnx.split(model)
    logits, from_hidden = _forward(graphdef, state, batch["input_ids"], batch["attention_mask"], images)
    assert logits.shape == (2, 90, cfg.llm.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(from_hidden))
    expected = np.asarray(model.compute_logits(batch))
    valid = batch["attention_mask"]                       # padding slots' logits are not defined
    assert _rel(np.asarray(logits)[valid], expected[valid]) <= 1e-5
