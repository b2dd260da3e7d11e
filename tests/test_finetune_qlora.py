"""QLoRA: LoRA adapters over a language model loaded with ``quantize="int8" | "int4"``.

On the tiny model (``helpers.train_config``: the tiny config with the fine-tuning tests' 512-word vocabulary,
so that a step takes milliseconds; the command line runs on the ``tiny_checkpoint`` with its tokenizer):

The adapters' gradients over the quantized base equal those over a float model holding the dequantized
kernels, and a finite difference of the loss; a run overfits four samples (the loss falls by ≥ 90 %, as
the LoRA overfit test asks), never touches the integer kernels, and resumed from a checkpoint continues
bit for bit; the checkpoint records the quantization and a float base cannot resume it. The export merges
every adapter into its dequantized kernel (and dequantizes the other projections): a float folder without a
quantization record whose logits equal the in-memory merged model's. Full fine-tuning of a quantized model
is refused, and ``minicpmv-jax finetune --quantize int8`` runs end to end (bfloat16, resume, export)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import text_batch, train_config
from minicpmv_jax import MiniCPMV, cli
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.finetune.checkpoint import TrainCheckpointer
from minicpmv_jax.finetune.config import LoRAConfig, TrainConfig
from minicpmv_jax.finetune.export import export_model, merged_copy
from minicpmv_jax.finetune.lora import LoRAEinsum
from minicpmv_jax.finetune.train_state import split_model
from minicpmv_jax.finetune.train_step import Trainer
from minicpmv_jax.finetune.trainer import CHECKPOINT_DIR, read_log
from minicpmv_jax.layers import Einsum
from minicpmv_jax.quantization import QuantizedEinsum
from minicpmv_jax.testing.checkpoint import write_checkpoint

pytestmark = pytest.mark.usefixtures("release_compiled_programs")  # see tests/conftest.py

PROJECTIONS = [("attn", p) for p in "qkvo"] + [("mlp", p) for p in ("gate", "up", "down")]
# Adapters on q/k/v/o, gate and up; down keeps no adapter, so the export also dequantizes a bare projection.
TARGETS = (r"llm/layers/\d+/attn/(q|k|v|o)", r"llm/layers/\d+/mlp/(gate|up)")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _flat(tree) -> dict:
    return dict(ock.flatten(jax.device_get(tree)))


def _load(folder, mode, dtype="float32"):
    return MiniCPMV.from_pretrained(folder, dtype=dtype, quantize=mode)


def _batch() -> dict:
    return text_batch(1, 4, 40, lengths=[40, 33, 17, 38])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qlora_base")
    write_checkpoint(folder, train_config(), seed=31, num_shards=1, tokenizer=False)
    return str(folder)


# --------------------------------------------------------------------------- what is trained


def test_full_finetuning_of_a_quantized_model_is_refused(base):
    model = _load(base, "int8")
    with pytest.raises(ArgumentError, match=r"TrainConfig.lora=None \(full fine-tuning\).*quantize='int8'.*"
                                            r"integers, which cannot be trained"):
        Trainer(model, TrainConfig(compute_dtype="float32"))
    assert isinstance(model.llm.layers[0].attn.q, QuantizedEinsum)            # refused before any change
    with pytest.raises(ValueError, match="not floats.*llm/layers/0/attn/k/kernel"):
        split_model(model, TrainConfig(compute_dtype="float32"))             # the guard behind it


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapter_gradients_over_the_quantized_base(base, mode):
    """Random non-zero adapters on all seven projections: the loss and every adapter gradient over the
    quantized base equal those over a float32 model whose kernels are the dequantized ones (≤ 1e-4), and
    the gradient's norm equals the loss's central difference along the gradient."""
    folder = base
    config = TrainConfig(compute_dtype="float32", train_resampler=False, loss_chunk=None,
                         lora=LoRAConfig(rank=3, alpha=7.0, target_modules=(r"llm/layers/\d+/(attn|mlp)/\w+",)))
    quantized, reference = _load(folder, mode), MiniCPMV.from_pretrained(folder, dtype="float32")
    for q_layer, r_layer in zip(quantized.llm.layers, reference.llm.layers):
        for part, name in PROJECTIONS:
            q, r = getattr(getattr(q_layer, part), name), getattr(getattr(r_layer, part), name)
            r.kernel.set_value(q.dequantized())
    batch = _batch()
    results = []
    for model in (quantized, reference):
        trainer = Trainer(model, config)
        state = trainer.init_state()
        params = jax.device_get(state.params)                      # A as drawn from the seed (the same for both)
        assert all(key[-1] in ("lora_a", "lora_b") for key, _ in ock.flatten(params))
        rng = np.random.default_rng(3)                             # B random instead of zero: the same for both
        for layer in params["llm"]["layers"].values():
            for proj in (*layer["attn"].values(), *layer["mlp"].values()):
                proj["lora_b"] = rng.normal(0, 0.1, proj["lora_b"].shape).astype(np.float32)
        state = dataclasses.replace(state, params=jax.tree.map(jnp.asarray, params))
        results.append((trainer, state, trainer.gradients(state, trainer.put_batch([batch]))))
    (trainer, state, (grads, loss, tokens)), (_, _, (ref_grads, ref_loss, ref_tokens)) = results
    assert int(tokens) == int(ref_tokens) > 0
    assert _rel(loss, ref_loss) <= 1e-5
    ours, ref = _flat(grads), _flat(ref_grads)
    assert ours.keys() == ref.keys() and len(ours) == 2 * 7 * len(quantized.llm.layers)
    for key, g in ref.items():
        assert np.abs(g).max() > 0, key
        assert _rel(ours[key], g) <= 1e-4, (key, _rel(ours[key], g))

    # Central difference along the gradient's direction (the loss's steepest slope, so that float32 rounding
    # of the loss, ≈ 6, stays far below the difference): the slope there is the gradient's norm.
    norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in ours.values()))
    eps = 1e-2
    device_batch = trainer.put_batch([batch])
    params = _flat(state.params)

    def loss_at(sign):
        moved = ock.nest({k: jnp.asarray(params[k] + sign * eps * ours[k] / norm) for k in params})
        return float(trainer.eval_step(dataclasses.replace(state, params=moved), device_batch)["loss"])

    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    assert abs(numeric - norm) <= 1e-2 * norm, (numeric, norm)


# --------------------------------------------------------------------------- a run: overfit, resume, export


CONFIG = TrainConfig(learning_rate=2e-2, warmup_steps=2, total_steps=40, compute_dtype="float32", seed=4,
                     train_resampler=False, lora=LoRAConfig(rank=8, alpha=16.0, dropout=0.05, target_modules=TARGETS))
STEPS, SAVE_EVERY = 40, 10


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    """40 int4 QLoRA steps on four rows, checkpointed every 10, with the uninterrupted losses."""
    folder = base
    ckpt_dir = str(tmp_path_factory.mktemp("qlora_ckpt"))
    trainer = Trainer(_load(folder, "int4"), CONFIG)
    frozen_before = _flat(nnx.to_pure_dict(trainer.frozen))
    batch = trainer.put_batch([_batch()])
    state = trainer.init_state()
    first = float(trainer.eval_step(state, batch)["loss"])
    losses = []
    with TrainCheckpointer(ckpt_dir, CONFIG, base_model=folder, lora_targets=trainer.lora_targets,
                           quantization=trainer.quantization, save_every=SAVE_EVERY, max_to_keep=None) as ckpt:
        for _ in range(STEPS):
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["loss"]))
            ckpt.save(state)
    final = float(trainer.eval_step(state, batch)["loss"])
    return dict(folder=folder, trainer=trainer, state=state, batch=batch, first=first, final=final, losses=losses,
                ckpt_dir=ckpt_dir, frozen_before=frozen_before)


def test_qlora_overfits_and_keeps_the_integers_frozen(run):
    trainer, state = run["trainer"], run["state"]
    assert trainer.quantization.mode == "int4" and len(trainer.lora_targets) == 6 * 2
    assert np.isfinite(run["losses"]).all()
    assert run["final"] <= 0.1 * run["first"], (run["first"], run["final"])
    # Only float32 adapters are trained; the integer kernels and their scales are frozen, bit for bit.
    assert all(k[-1] in ("lora_a", "lora_b") and v.dtype == np.float32 for k, v in _flat(state.params).items())
    frozen = _flat(nnx.to_pure_dict(trainer.frozen))
    kernels = [k for k, v in frozen.items() if v.dtype == jnp.int4]
    assert len(kernels) == 7 * 2
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]       # Adam's mu and nu, per adapter only
    assert len(moments) == 2 * len(_flat(state.params)) and all(x.dtype == jnp.float32 for x in moments)
    for key, value in run["frozen_before"].items():
        np.testing.assert_array_equal(np.asarray(frozen[key]), np.asarray(value), err_msg=str(key))


def test_resume_equals_the_uninterrupted_run(run):
    """A fresh int4 model and trainer restored at step 30 run steps 31–40 with the same losses and
    parameters, bit for bit; the checkpoint records the quantization, and a float base is refused."""
    folder = run["folder"]
    ckpt = TrainCheckpointer(run["ckpt_dir"], CONFIG, base_model=folder)
    assert ckpt.steps() == [10, 20, 30, 40]
    assert ckpt.metadata()["quantization"] == {"mode": "int4", "group_size": 128, "lm_head": False}
    fresh = Trainer(_load(folder, "int4"), CONFIG)
    state, meta = ckpt.restore(fresh, step=30)
    assert int(state.step) == 30
    for i in range(30, STEPS):
        state, metrics = fresh.train_step(state, run["batch"])
        assert float(metrics["loss"]) == run["losses"][i], i
    expected = _flat(run["state"].params)
    for key, value in _flat(state.params).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=str(key))
    with pytest.raises(ValueError, match=r"loaded with quantize='int4', the trainer's model was loaded with "
                                         r"quantize=None"):
        ckpt.restore(Trainer(MiniCPMV.from_pretrained(folder, dtype="float32"), CONFIG), step=30)
    ckpt.close()


def test_export_merges_into_a_float_model(run, tmp_path):
    """The merged copy holds float Einsums only: ``kernel·scale + (alpha/r)·A·B`` where an adapter was, the
    dequantized kernel elsewhere; its logits are the adapter model's; the exported folder has no
    quantization record, loads as a float model and gives the merged model's logits exactly."""
    trainer, state = run["trainer"], run["state"]
    tuned = trainer.model(state)
    merged = merged_copy(tuned)
    assert isinstance(tuned.llm.layers[0].attn.q, LoRAEinsum) and tuned.quantization is not None   # a copy merged
    assert merged.quantization is None
    assert not any(isinstance(m, (LoRAEinsum, QuantizedEinsum)) for _, m in nnx.iter_modules(merged))
    for t_layer, m_layer in zip(tuned.llm.layers, merged.llm.layers):
        for part, name in PROJECTIONS:
            t, m = getattr(getattr(t_layer, part), name), getattr(getattr(m_layer, part), name)
            assert type(m) is Einsum and m.kernel.get_value().dtype == jnp.float32
            if isinstance(t, LoRAEinsum):
                expected = np.asarray(t.base.dequantized(), np.float64) + np.asarray(t.delta(), np.float64)
                assert _rel(m.kernel.get_value(), expected) <= 1e-6, (part, name)
                assert np.abs(np.asarray(t.delta())).max() > 0
            else:
                assert name == "down"
                np.testing.assert_array_equal(np.asarray(m.kernel.get_value()), np.asarray(t.dequantized()))
    batch = text_batch(9, 2, 24)
    mask = batch["attention_mask"]
    merged_logits = np.asarray(merged.compute_logits(batch))[mask]
    assert _rel(merged_logits, np.asarray(tuned.compute_logits(batch))[mask]) <= 1e-4

    dst = tmp_path / "exported"
    export_model(tuned, dst, base_model=run["folder"], info={"step": int(state.step)})
    manifest = json.loads((dst / ock.MANIFEST_FILE).read_text())
    assert "quantization" not in manifest and manifest["dtype"]["stored"] == {"float32": manifest["params"]["arrays"]}
    assert ock.stored_quantization(str(dst)) is None
    loaded = MiniCPMV.from_pretrained(dst, dtype="float32")
    assert loaded.quantization is None and isinstance(loaded.llm.layers[0].mlp.down, Einsum)
    merged_params = dict(nnx.to_flat_state(nnx.state(merged, nnx.Param)))
    loaded_params = nnx.to_flat_state(nnx.state(loaded, nnx.Param))
    assert len(loaded_params) == len(merged_params)
    for path, var in loaded_params:
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(merged_params[path].get_value()))
    np.testing.assert_array_equal(np.asarray(loaded.compute_logits(batch))[mask], merged_logits)


# --------------------------------------------------------------------------- the command line


def _cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_finetune_quantize_int8(capsys, tiny_checkpoint, tmp_path):
    """``finetune --quantize int8`` in bfloat16: trains, checkpoints, resumes (only with the same
    --quantize), and exports a bfloat16 float model that ``from_pretrained`` loads; --full is refused."""
    samples = [{"id": f"s{i}", "conversations": [{"role": "user", "content": f"Say {word}."},
                                                 {"role": "assistant", "content": f"{word.title()}!"}]}
               for i, word in enumerate(["one", "two", "three", "four"])]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(samples))
    output = tmp_path / "run"
    args = ("finetune", "--model", tiny_checkpoint[0], "--data", data, "--output", output, "--dtype", "bfloat16",
            "--batch-size", 2, "--max-length", 64, "--lr", 1e-3, "--log-every", 1, "--save-every", 1, "--no-progress")

    code, out, err = _cli(capsys, *args, "--quantize", "int8", "--full", "--steps", 1)
    assert code == 2 and err.startswith("minicpmv-jax finetune: error: --full trains every weight") and \
        "--quantize int8 loads its projections as integers" in err and len(err.strip().splitlines()) == 1, err
    assert not output.exists()

    code, out, err = _cli(capsys, *args, "--quantize", "int8", "--steps", 2)
    assert code == 0, err
    assert [e["step"] for e in read_log(output)] == [1, 2]
    ckpt = TrainCheckpointer(output / CHECKPOINT_DIR, TrainConfig())
    assert ckpt.metadata()["quantization"]["mode"] == "int8"
    ckpt.close()

    code, out, err = _cli(capsys, *args, "--steps", 3, "--resume")           # --quantize left out
    assert code == 2 and "written with --quantize int8; this run has no --quantize" in err, err
    code, out, err = _cli(capsys, *args, "--quantize", "int8", "--steps", 3, "--resume")
    assert code == 0, err
    assert out.splitlines()[0].startswith("resuming at step 2") and [e["step"] for e in read_log(output)] == [1, 2, 3]

    manifest = json.loads((output / "model" / ock.MANIFEST_FILE).read_text())
    assert "quantization" not in manifest and set(manifest["dtype"]["stored"]) == {"bfloat16"}
    assert manifest["finetune"]["step"] == 3 and manifest["finetune"]["base_quantization"]["mode"] == "int8"
    exported = MiniCPMV.from_pretrained(output / "model", dtype="bfloat16")
    assert exported.quantization is None
    assert not any(isinstance(m, QuantizedEinsum) for _, m in nnx.iter_modules(exported))
