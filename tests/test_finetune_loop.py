"""The fine-tuning loop (``minicpmv_jax.finetune.trainer.fit``) on the demo-sized model with its byte-level
tokenizer: the JSONL log (windows, counts, learning rates) equals a hand-driven ``Trainer`` on the same
batches, the evaluation loss equals a numpy cross-entropy of the tuned model's logits, runs resumed after
a crash or Ctrl-C log exactly what the uninterrupted run logs, and the exported model, chatted with, gives
the answers it was trained on."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from minicpmv_jax import MiniCPMV, MiniCPMVProcessor, cli
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.demo import demo_checkpoint
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.finetune.batching import FinetuneDataset
from minicpmv_jax.finetune.checkpoint import TrainCheckpointer
from minicpmv_jax.finetune.config import LoRAConfig, TrainConfig
from minicpmv_jax.finetune.data import DataConfig, load_samples
from minicpmv_jax.finetune.trainer import CHECKPOINT_DIR, LoopConfig, SettingChangedError, fit, read_log
from minicpmv_jax.finetune.train_step import Trainer
from reference import rel_err

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
QUESTION = "What color is this?"
# Timings differ between runs; every other field of a log entry must not.
TIMING = ("tokens_per_s", "samples_per_s", "elapsed", "eval_seconds")

# 12 steps of 2 micro-batches × 2 rows (one epoch per step), LoRA with dropout and the resampler trained.
CONFIG = TrainConfig(learning_rate=2e-2, warmup_steps=2, total_steps=12, grad_accum_steps=2, seed=3,
                     compute_dtype="float32", lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1))
# Windows of 5 steps, checkpoints every 3: resumed runs restart inside a window.
LOOP = LoopConfig(log_every=5, save_every=3, eval_every=6, max_to_keep=None, progress=False, verbose=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return demo_checkpoint(str(tmp_path_factory.mktemp("demo_cache")))


@pytest.fixture(scope="module")
def processor(base):
    return MiniCPMVProcessor.from_pretrained(base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train.json: one solid-colour image per colour, "It is <colour>."; eval.json: two other phrasings."""
    root = tmp_path_factory.mktemp("loop_data")
    for name, rgb in COLORS.items():
        Image.new("RGB", (56, 56), rgb).save(root / f"{name}.png")

    def sample(name, question, answer):
        return {"id": name, "image": f"{name}.png", "conversations": [
            {"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]}

    train = [sample(name, QUESTION, f"It is {name}.") for name in COLORS]
    held_out = [sample("red", "Which colour?", "Red."), sample("blue", QUESTION, "It is blue, clearly.")]
    (root / "train.json").write_text(json.dumps(train))
    (root / "eval.jsonl").write_text("".join(json.dumps(s) + "\n" for s in held_out))
    return root


def datasets(data, processor, batch_size=2):
    config = DataConfig(max_length=256, batch_size=batch_size, max_slice_nums=1, seed=5)
    train = FinetuneDataset.from_file(data / "train.json", processor, config)
    held_out = FinetuneDataset.from_file(data / "eval.jsonl", processor,
                                         DataConfig(max_length=256, batch_size=2, max_slice_nums=1, shuffle=False))
    return train, held_out


def run(base, data, processor, output, *, loop=LOOP, config=CONFIG, stop_at=None, exc=RuntimeError):
    """``fit`` on fresh copies of everything; ``stop_at``: the data stream raises ``exc`` at that global batch."""
    train, held_out = datasets(data, processor)
    if stop_at is not None:
        stream = train.stream

        def failing(start_step=0):
            for i, batch in enumerate(stream(start_step), start=start_step):
                if i == stop_at:
                    raise exc("stopped by the test")
                yield batch

        train.stream = failing
    return fit(MiniCPMV.from_pretrained(base, dtype="float32"), train, config, output, base_model=base,
               eval_dataset=held_out, loop=loop)


def without_timing(log):
    return [{k: v for k, v in entry.items() if k not in TIMING} for entry in log]


@pytest.fixture(scope="module")
def uninterrupted(base, data, processor, tmp_path_factory):
    return run(base, data, processor, tmp_path_factory.mktemp("runs") / "full")


def test_log_matches_a_hand_driven_trainer(base, data, processor, uninterrupted):
    log = read_log(uninterrupted.output)
    assert log == uninterrupted.log
    assert [(e["step"], "eval_loss" in e) for e in log] == [(5, False), (6, True), (10, False), (12, False),
                                                            (12, True)]
    # The same steps by hand: the dataset's stream, A micro-batches per step, the same compiled program.
    train, _ = datasets(data, processor)
    trainer = Trainer(MiniCPMV.from_pretrained(base, dtype="float32"), CONFIG)
    state, stream, steps = trainer.init_state(), train.stream(), []
    for _ in range(CONFIG.total_steps):
        micro = [next(stream) for _ in range(CONFIG.grad_accum_steps)]
        state, metrics = trainer.train_step(state, trainer.put_batch(micro))
        steps.append((jax.device_get(metrics), sum(int(b["attention_mask"].sum()) for b in micro)))
    per_epoch = train.steps_per_epoch()
    for entry, (first, last) in zip([e for e in log if "loss" in e], [(0, 5), (5, 10), (10, 12)]):
        window = steps[first:last]
        targets = sum(int(m["tokens"]) for m, _ in window)
        assert entry["loss"] == sum(float(m["loss"]) * int(m["tokens"]) for m, _ in window) / targets
        assert entry["target_tokens"] == targets
        assert entry["tokens"] == sum(t for _, t in window)
        assert entry["samples"] == 4 * (last - first) and entry["steps"] == last - first
        assert entry["lr"] == float(window[-1][0]["learning_rate"])
        assert entry["lr"] == pytest.approx(float(trainer.schedule(last - 1)), rel=1e-5)   # eager vs jitted cos
        assert entry["grad_norm"] == float(window[-1][0]["grad_norm"])
        assert entry["epoch"] == last * CONFIG.grad_accum_steps / per_epoch
        assert entry["tokens_per_s"] > 0 and entry["elapsed"] > 0
    assert [int(s) for s in (state.step, uninterrupted.state.step)] == [12, 12]
    for key, value in ock.flatten(jax.device_get(state.params)):
        np.testing.assert_array_equal(value, dict(ock.flatten(jax.device_get(uninterrupted.state.params)))[key])
    # Checkpoints every 3 steps, each with the data position to resume from.
    ckpt = TrainCheckpointer(os.path.join(uninterrupted.output, CHECKPOINT_DIR), CONFIG)
    assert ckpt.steps() == [3, 6, 9, 12]
    assert ckpt.metadata(9)["data"]["batches"] == 18 and ckpt.metadata(9)["data"]["window"]["steps"] == 4
    ckpt.close()


def test_eval_loss_is_the_cross_entropy_of_the_tuned_model(data, processor, uninterrupted):
    """eval_loss at the last step = mean −log p over every target token of the held-out set (numpy)."""
    _, held_out = datasets(data, processor)
    model = uninterrupted.trainer.model(uninterrupted.state)
    losses = []
    for batch in held_out.batches():
        logits = np.asarray(model.compute_logits(batch), np.float64)[:, :-1]
        log_p = logits - logits.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_p, batch["input_ids"][:, 1:, None].astype(np.int64), -1)[..., 0]
        losses.extend(-picked[batch["loss_mask"][:, 1:]])
    final = uninterrupted.log[-1]
    assert final["eval_tokens"] == len(losses) > 0 and final["eval_samples"] == 2
    assert rel_err(np.float64(final["eval_loss"]), np.mean(losses)) <= 1e-5
    first_eval = next(e for e in uninterrupted.log if "eval_loss" in e)
    assert final["eval_loss"] < first_eval["eval_loss"]


@pytest.mark.parametrize("exc, stop_at, kept", [(RuntimeError, 21, [3, 6, 9]), (KeyboardInterrupt, 15, [3, 6, 7])],
                         ids=["crash", "ctrl-c"])
def test_resume_logs_what_the_uninterrupted_run_logs(base, data, processor, uninterrupted, tmp_path, exc, stop_at,
                                                     kept):
    """A crash at step 11 (batch 21) leaves step 9's checkpoint and the entries up to step 10; Ctrl-C at
    step 8 saves step 7. Resuming drops the entries after the checkpoint and logs the rest exactly as the
    uninterrupted run did (steps 9–10 / 6–7 come from the checkpoint's window sums)."""
    output = tmp_path / "run"
    with pytest.raises(exc, match="stopped by the test"):
        run(base, data, processor, output, stop_at=stop_at, exc=exc)
    ckpt = TrainCheckpointer(output / CHECKPOINT_DIR, CONFIG)
    assert ckpt.steps() == kept
    ckpt.close()
    before = read_log(output)
    assert before and before[-1]["step"] == (10 if exc is RuntimeError else 6)

    with pytest.raises(FileExistsError, match=r"exists and is not empty: pass resume=True to continue"):
        run(base, data, processor, output)
    resumed = run(base, data, processor, output, loop=dataclasses.replace(LOOP, resume=True))
    assert resumed.resumed_from == kept[-1]
    assert without_timing(resumed.log) == without_timing(uninterrupted.log)
    for key, value in ock.flatten(jax.device_get(resumed.state.params)):
        np.testing.assert_array_equal(value, dict(ock.flatten(jax.device_get(uninterrupted.state.params)))[key])


def test_resume_refuses_other_settings(base, data, processor, uninterrupted):
    """Resuming with another learning rate, batch size or LoRA rank, or with other samples, is refused before
    anything is trained or written; the error names the setting (as Python spells it) or the data."""
    output = uninterrupted.output
    files = sorted(os.listdir(output)), read_log(output)
    resume = dataclasses.replace(LOOP, resume=True)
    held = f"output={output!r} holds a checkpoint (step 12) "
    with pytest.raises(SettingChangedError, match=re.escape(
            held + "written with TrainConfig.learning_rate=0.02; this run has TrainConfig.learning_rate=0.01")):
        run(base, data, processor, output, loop=resume, config=dataclasses.replace(CONFIG, learning_rate=1e-2))
    with pytest.raises(SettingChangedError, match=r"TrainConfig.lora.rank=4; this run has TrainConfig.lora.rank=2"):
        run(base, data, processor, output, loop=resume,
            config=dataclasses.replace(CONFIG, lora=LoRAConfig(rank=2, alpha=8.0, dropout=0.1)))
    train, _ = datasets(data, processor, batch_size=1)
    with pytest.raises(SettingChangedError, match=r"DataConfig.batch_size=2; this run has DataConfig.batch_size=1") \
            as err:
        fit(MiniCPMV.from_pretrained(base, dtype="float32"), train, CONFIG, output, base_model=base, loop=resume)
    assert (err.value.setting, err.value.before, err.value.now) == ("DataConfig.batch_size", 2, 1)
    train = FinetuneDataset.from_samples(load_samples(data / "train.json")[:3], processor,
                                         datasets(data, processor)[0].config)
    with pytest.raises(ArgumentError, match=re.escape(held + "trained on other data than this run's dataset (4 "
                                                      "usable samples then, 3 now)")):
        fit(MiniCPMV.from_pretrained(base, dtype="float32"), train, CONFIG, output, base_model=base, loop=resume)
    assert (sorted(os.listdir(output)), read_log(output)) == files


def test_exported_model_answers_what_it_learned(base, data, processor, tmp_path, capsys):
    """40 LoRA steps on the four colours: the loss falls by ≥ 90 %, and the exported (merged) model, loaded
    from its folder, answers each training image with its colour — through the Python API and the CLI."""
    config = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=40, compute_dtype="float32",
                         lora=LoRAConfig(rank=8))
    train, _ = datasets(data, processor, batch_size=4)
    result = fit(MiniCPMV.from_pretrained(base, dtype="float32"), train, config, tmp_path / "run", base_model=base,
                 loop=LoopConfig(log_every=5, save_every=40, progress=False, verbose=False))
    losses = [e["loss"] for e in result.log]
    assert len(losses) == 8 and losses[-1] <= 0.1 * losses[0], losses
    model = MiniCPMV.from_pretrained(result.model_dir, dtype="float32")
    for name in COLORS:
        image = Image.open(data / f"{name}.png")
        answer = model.chat(msgs=[{"role": "user", "content": [image, QUESTION]}], processor=processor,
                            sampling=False, num_beams=1, max_new_tokens=20)
        assert answer == f"It is {name}.", (name, answer)
    code = cli.main(["chat", "--model", os.path.abspath(result.model_dir), "--dtype", "float32", "--greedy",
                     "--max-new-tokens", "20", "--image", str(data / "blue.png"), QUESTION])
    assert (code, capsys.readouterr().out) == (0, "It is blue.\n")
