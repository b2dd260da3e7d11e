"""``minicpmv-jax finetune`` end to end on the tiny checkpoint (real Qwen2 tokenizer) with a 4-sample data
file: it trains, logs, checkpoints and exports a model that ``chat`` loads; ``--resume`` continues; flags map
onto the TrainConfig; bad input is one line on stderr with exit status 2 and leaves no output folder."""

from __future__ import annotations

import json
import os

import pytest

from helpers import noise_image
from minicpmv_jax import cli
from minicpmv_jax.cli_finetune import _train_config
from minicpmv_jax.finetune.checkpoint import TrainCheckpointer
from minicpmv_jax.finetune.config import DEFAULT_LORA_TARGETS, TrainConfig
from minicpmv_jax.finetune.trainer import CHECKPOINT_DIR, read_log


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune_cli")
    for i in range(3):
        noise_image(i, 40, 30).save(d / f"{i}.png")
    samples = [{"id": f"s{i}", "image": f"{i}.png", "conversations": [user("What is it?"), assistant(f"Noise {i}.")]}
               for i in range(3)]
    samples.append({"id": "text", "conversations": [user("Hello"), assistant("Hi!")]})
    (d / "train.json").write_text(json.dumps(samples))
    (d / "eval.jsonl").write_text(json.dumps(samples[0]) + "\n" + json.dumps(samples[3]) + "\n")
    bad = samples[:2] + [{"id": "lost", "image": "missing.png", "conversations": samples[0]["conversations"]}]
    (d / "bad.json").write_text(json.dumps(bad))
    (d / "broken.json").write_text('[{"id": "x", "conversations": ')
    return d


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def finetune_args(model, files, output, *extra):
    return ("finetune", "--model", model, "--data", files / "train.json", "--output", output, "--dtype", "float32",
            "--batch-size", 2, "--max-slice-nums", 1, "--max-length", 256, "--lr", 1e-3, "--no-progress", *extra)


def test_finetune_trains_logs_resumes_and_exports(capsys, tiny_checkpoint, files, tmp_path):
    output = tmp_path / "run"
    args = finetune_args(tiny_checkpoint[0], files, output, "--eval-data", files / "eval.jsonl", "--log-every", 1,
                         "--save-every", 2, "--grad-accum", 2)
    code, out, err = run(capsys, *args, "--steps", 3)
    assert code == 0, err
    log = read_log(output)
    assert [(e["step"], "eval_loss" in e) for e in log] == [(1, False), (2, False), (3, False), (3, True)]
    assert all(e["samples"] == 4 and e["tokens"] > 0 and e["loss"] > 0 for e in log if "loss" in e)
    assert f"step 3/3  eval_loss {log[-1]['eval_loss']:.4f}" in out
    assert out.splitlines()[-1].startswith("finetune: 3 steps, loss ")
    ckpt = TrainCheckpointer(output / CHECKPOINT_DIR, TrainConfig())
    assert ckpt.steps() == [2, 3] and ckpt.metadata()["data"]["batches"] == 6
    ckpt.close()
    assert json.loads((output / "model" / "convert_manifest.json").read_text())["finetune"]["step"] == 3

    code, out, err = run(capsys, *args, "--steps", 3)              # the folder is taken
    assert err == (f"minicpmv-jax finetune: error: --output {output} exists and is not empty: pass --resume to "
                   "continue its run, or choose a new folder\n") and code == 2
    code, out, err = run(capsys, *args, "--steps", 5, "--resume")  # continue to step 5
    assert code == 0, err
    assert out.splitlines()[0].startswith("resuming at step 3")
    resumed = read_log(output)
    assert resumed[:4] == log and [e["step"] for e in resumed[4:]] == [4, 5, 5]
    assert json.loads((output / "model" / "convert_manifest.json").read_text())["finetune"]["step"] == 5

    code, out, err = run(capsys, "chat", "--model", os.path.abspath(output / "model"), "--dtype", "float32",
                         "--greedy", "--max-new-tokens", 3, "--image", files / "0.png", "What is it?")
    assert code == 0 and out.endswith("\n"), err


@pytest.mark.parametrize("argv, expected", [
    ((), "no such file"),                                            # --data points nowhere
    (("--data", "broken.json"), "broken.json"),
    (("--data", "bad.json", "--on-bad", "error"), "(id 'lost'): image file not found"),
    (("--data", "bad.json", "--on-bad", "error"), "; --on-bad skip leaves them out"),
    (("--mesh", "2x2"), "--mesh 2x2: expected a mesh shape DATAxFSDPxTENSOR"),
    (("--mesh", "3x1x1"), "--mesh 3x1x1: data=3 × fsdp=1 × tensor=1 = 3 devices, but 8 devices are given"),
    (("--mesh", "0x1x1"), "--mesh 0x1x1: data=0 must be a positive integer or -1 (the rest of the devices)"),
    (("--warmup", 9, "--steps", 4), "--warmup 9"),
    (("--lora-dropout", 1.5), "--lora-dropout"),
    (("--lora-targets", "nothing/here"), "--lora-targets nothing/here match no Einsum module"),
], ids=["missing-data", "broken-json", "bad-sample", "bad-sample-remedy", "mesh-syntax", "mesh-size", "mesh-zero",
        "warmup", "dropout", "lora-targets"])
def test_bad_input_is_one_line(capsys, tiny_checkpoint, files, tmp_path, argv, expected):
    output = tmp_path / "run"
    args = list(finetune_args(tiny_checkpoint[0], files, output))
    if argv and argv[0] == "--data":
        args[args.index("--data") + 1] = files / argv[1]
        argv = argv[2:]
    elif not argv:
        args[args.index("--data") + 1] = files / "nothing.json"
    code, out, err = run(capsys, *args, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minicpmv-jax finetune: error: ") and expected in lines[0], err
    assert "on_bad" not in err and "make_mesh" not in err and "Config." not in err  # flags, not Python names
    assert not output.exists()


def test_bad_samples_are_skipped_by_default(capsys, tiny_checkpoint, files, tmp_path):
    args = list(finetune_args(tiny_checkpoint[0], files, tmp_path / "run", "--steps", 1, "--no-export"))
    args[args.index("--data") + 1] = files / "bad.json"
    code, out, err = run(capsys, *args)
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "1 of 3 samples are bad" in warning[0] and "lost" in warning[0]
    assert warning[0].endswith("; they are skipped (--on-bad skip)") and "on_bad" not in warning[0]
    assert not (tmp_path / "run" / "model").exists()


def test_flags_map_onto_the_train_config():
    parse = cli.build_parser().parse_args
    base = ["finetune", "--model", "m", "--data", "d", "--output", "o"]
    lora = _train_config(parse(base), 10)
    assert lora.lora.rank == 8 and lora.lora.alpha == 16.0 and lora.lora.target_modules == DEFAULT_LORA_TARGETS
    assert (lora.learning_rate, lora.train_resampler, lora.train_vision, lora.max_grad_norm) == (1e-4, True, False, 1.0)
    assert lora.compute_dtype == "bfloat16" and lora.remat and lora.total_steps == 10
    assert lora.loss_chunk == TrainConfig().loss_chunk
    assert _train_config(parse(base + ["--loss-chunk", "64"]), 10).loss_chunk == 64
    assert _train_config(parse(base + ["--no-loss-chunk"]), 10).loss_chunk is None
    with pytest.raises(ValueError, match="contradict"):
        _train_config(parse(base + ["--no-loss-chunk", "--loss-chunk", "64"]), 10)
    custom = _train_config(parse(base + ["--lora-rank", "4", "--lora-alpha", "4", "--lora-dropout", "0.1",
                                         "--lora-targets", r"!llm/layers/0/.*", r"llm/layers/\d+/mlp/.*",
                                         "--no-train-resampler", "--train-vision", "--max-grad-norm", "0",
                                         "--grad-accum", "3", "--warmup", "2", "--weight-decay", "0.1",
                                         "--seed", "7", "--dtype", "float32", "--no-remat"]), 10)
    assert (custom.lora.rank, custom.lora.alpha, custom.lora.dropout) == (4, 4.0, 0.1)
    assert custom.lora.target_modules == (r"!llm/layers/0/.*", r"llm/layers/\d+/mlp/.*")
    assert (custom.train_resampler, custom.train_vision, custom.max_grad_norm) == (False, True, None)
    assert (custom.grad_accum_steps, custom.warmup_steps, custom.weight_decay, custom.seed) == (3, 2, 0.1, 7)
    assert custom.compute_dtype == "float32" and not custom.remat
    full = _train_config(parse(base + ["--full"]), 10)
    assert full.lora is None and full.learning_rate == 1e-5
    with pytest.raises(SystemExit):
        parse(base + ["--steps", "3", "--epochs", "2"])               # one or the other


@pytest.fixture(scope="module")
def finished_run(tiny_checkpoint, files, tmp_path_factory):
    """The folder of a finished 1-step run (LoRA rank 8, --batch-size 2, --grad-accum 1, seed 0)."""
    output = tmp_path_factory.mktemp("finished") / "run"
    argv = finetune_args(tiny_checkpoint[0], files, output, "--steps", 1, "--no-export")
    assert cli.main([str(a) for a in argv]) == 0
    return output


@pytest.mark.parametrize("change, then, now", [
    (("--batch-size", 1), "--batch-size 2", "--batch-size 1"),
    (("--grad-accum", 2), "--grad-accum 1", "--grad-accum 2"),
    (("--full",), "--lora-rank 8", "--full"),
    (("--no-train-resampler",), "--train-resampler", "--no-train-resampler"),
], ids=["batch-size", "grad-accum", "full", "train-resampler"])
def test_resume_with_other_settings_names_the_flag(capsys, tiny_checkpoint, files, finished_run, change, then, now):
    """Changing a setting between runs is blamed on that flag, with both values (not on the data)."""
    argv = finetune_args(tiny_checkpoint[0], files, finished_run, "--steps", 1, "--no-export", "--resume", *change)
    code, out, err = run(capsys, *argv)
    assert code == 2 and err == (
        f"minicpmv-jax finetune: error: --output {finished_run} holds a checkpoint (step 1) written with {then}; "
        f"this run has {now}: resume with the same settings, or start a new run in another folder\n")


def test_resume_with_other_data_names_the_data(capsys, tiny_checkpoint, files, finished_run):
    argv = list(finetune_args(tiny_checkpoint[0], files, finished_run, "--steps", 1, "--no-export", "--resume"))
    argv[argv.index("--data") + 1] = files / "bad.json"                # 2 usable samples of 3, not 4 of 4
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.splitlines()[-1] == (
        f"minicpmv-jax finetune: error: --output {finished_run} holds a checkpoint (step 1) trained on other data "
        "than this run's --data (4 usable samples then, 2 now): the batches would not continue; resume with the "
        "same data, or start a new run in another folder")


def test_resume_may_change_what_does_not_change_the_run(capsys, tiny_checkpoint, files, finished_run):
    """--on-bad, --no-remat and --no-loss-chunk change no batch and no result: the run resumes (here: at its
    last step, so there is nothing left to train)."""
    argv = finetune_args(tiny_checkpoint[0], files, finished_run, "--steps", 1, "--no-export", "--resume",
                         "--on-bad", "error", "--no-remat", "--no-loss-chunk")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out.startswith("resuming at step 1")


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "LoRA or full fine-tuning on a JSON or JSONL data file" in out
    assert not any(markup in out for markup in ("``", ":mod:", ":class:", ":func:")), out
