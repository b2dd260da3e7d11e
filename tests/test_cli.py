"""The ``minicpmv-jax`` command line (the installed console script, as a user runs it)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from minicpmv_jax import config as C
from minicpmv_jax.testing.checkpoint import write_checkpoint


def _cli():
    exe = shutil.which("minicpmv-jax", path=os.path.dirname(sys.executable)) or shutil.which("minicpmv-jax")
    assert exe, "the minicpmv-jax console script is not installed"
    return exe


def test_info_on_a_good_checkpoint(tmp_path):
    write_checkpoint(tmp_path, C.tiny(vocab_size=1009), num_shards=2, tokenizer=False)
    out = subprocess.run([_cli(), "info", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ": OK" in out.stdout and "3 layers, width 128" in out.stdout and "2 of 3 layers run" in out.stdout


def test_info_reports_a_broken_checkpoint_in_one_line(tmp_path):
    write_checkpoint(tmp_path, C.tiny(vocab_size=1009), num_shards=2, tokenizer=False)
    os.remove(tmp_path / "model-00001-of-00002.safetensors")
    out = subprocess.run([_cli(), "info", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "model-00001-of-00002.safetensors, which does not exist" in out.stderr


@pytest.mark.parametrize("argv", [["--version"], ["info", "--help"]])
def test_help_and_version(argv):
    out = subprocess.run([_cli(), *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "minicpmv-jax" in out.stdout


def test_plan_prints_per_device_memory(capsys):
    from minicpmv_jax import cli

    assert cli.main(["plan", "--mesh", "1x8x1", "--batch", "2", "--max-len", "1024", "--device-memory", "16"]) == 0
    out = capsys.readouterr().out
    row = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # 8,083,935,648 bf16 parameters (docs/model.md §2); fsdp=8 splits every matrix 8 ways, norms and a few
    # biases stay whole, so a device holds just over 1/8.
    params = 8_083_935_648 * 2 / 2**30
    assert row["all"][2] == "8,083,935,648" and float(row["all"][3]) == pytest.approx(params, abs=0.01)
    assert params / 8 - 0.005 <= float(row["all"][5]) <= params / 8 + 0.01  # printed to 0.01 GiB
    # KV cache: K and V × 28 layers × batch 2 × 1024 slots × 4 KV heads × 128 × 2 bytes; batch 2 does not
    # divide fsdp=8, so every device holds all of it.
    kv = 2 * 28 * 2 * 1024 * 4 * 128 * 2 / 2**30
    assert float(row["KV"][6]) == pytest.approx(kv, abs=0.01) and float(row["KV"][8]) == pytest.approx(kv, abs=0.01)
    assert "16 GiB per device" in out and "left for activations" in out


def test_plan_bad_mesh_is_one_line(capsys):
    from minicpmv_jax import cli

    assert cli.main(["plan", "--mesh", "2x2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2x2" in err and "DATAxFSDPxTENSOR" in err


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "1x-1x1"], "--mesh 1x-1x1: fsdp=-1 must be a positive integer"),   # no devices: -1 means nothing
    (["--mesh", "0x1x1"], "--mesh 0x1x1: data=0 must be a positive integer"),      # ... so it is not offered
    (["--mesh", "2x2"], "--mesh 2x2: expected a mesh shape DATAxFSDPxTENSOR, e.g. 1x1x8 or 2x4x1"),
    (["--mesh", "1x1x1", "--model", "no/such/model"], "--model no/such/model: not a checkpoint folder, a "
     "config.json file, or one of the presets ['8b', 'minicpm-v-2_6', 'minicpmv-2_6', 'openbmb/minicpm-v-2_6', "
     "'tiny']"),
    (["--mesh", "1x1x1", "--batch", "0"], "--batch 0 must be positive"),
    (["--mesh", "1x1x1", "--compile"], "--compile needs --prompt-len (the prompt length to compile the prefill "
     "for)"),
    (["--mesh", "1x1x1", "--prompt-len", "64"], "--prompt-len is the length of the compiled prefill: add --compile"),
    (["--mesh", "1x1x1", "--model", "tiny", "--compile", "--prompt-len", "0"], "--prompt-len 0 must be an int ≥ 1"),
], ids=["minus-one", "zero", "syntax", "model", "batch", "compile-without-length", "length-without-compile",
        "length-zero"])
def test_plan_errors_name_the_flags(capsys, argv, message):
    from minicpmv_jax import cli

    assert cli.main(["plan", *argv]) == 2
    assert capsys.readouterr().err == f"minicpmv-jax plan: error: {message}\n"


def test_plan_notes_mesh_axes_that_split_nothing(capsys):
    """3 divides neither Qwen2-7B's width 3584 nor its heads, MLP or vocabulary: on 3x3x3 the LLM is whole on
    every device, and the plan says so, with the sizes that would split it."""
    from minicpmv_jax import cli

    assert cli.main(["plan", "--mesh", "3x3x3"]) == 0
    out = capsys.readouterr().out
    llm = next(line.split() for line in out.splitlines() if line.strip().startswith("llm"))
    assert llm[3] == llm[5] and llm[4] == llm[6] == "GiB"    # per device = total: nothing split
    assert [line for line in out.splitlines() if line.startswith("note:")] == [
        "note: data=3 divides none of the dimensions it would split (cache_batch 1), so the KV cache is replicated "
        "over it",
        "note: fsdp=3 divides none of the dimensions it would split (embed 3584, cache_batch 1), so llm (Qwen2) and "
        "the KV cache are replicated over it; sizes that divide some of them: 2, 4, 7, 8",
        "note: tensor=3 divides none of the dimensions it would split (vocab 151666, embed 3584, kv_heads 4, "
        "head_dim 128, heads 28, mlp 18944, cache_kv_heads 4, cache_head_dim 128), so llm (Qwen2) and the KV cache "
        "are replicated over it; sizes that divide some of them: 2, 4, 7, 8",
    ]
    assert cli.main(["plan", "--mesh", "2x2x4", "--batch", "4"]) == 0     # every axis splits something
    assert "note:" not in capsys.readouterr().out
    assert cli.main(["plan", "--mesh", "1x1x1"]) == 0
    assert "(1 device);" in capsys.readouterr().out


def test_plan_compile_prints_xla_memory_as_json(capsys):
    """``plan --compile --json`` on the tiny preset: one JSON object with the hand-counted plan and XLA's
    memory analysis of the compiled prefill and decode step (per device); the arguments hold at least the
    language model's parameters (a text prefill reads no vision weight, and jit drops unused arguments),
    the prefill's outputs at least the KV cache of T + N slots."""
    from minicpmv_jax import cli
    from minicpmv_jax.config import tiny

    argv = ["plan", "--model", "tiny", "--mesh", "1x1x1", "--dtype", "float32", "--compile", "--prompt-len", "100",
            "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_slots"] == 128 and out["cache_slots"] == 144 and out["backend"] == "cpu"
    llm = tiny().llm
    kv = 2 * llm.num_hidden_layers * 144 * llm.num_key_value_heads * llm.head_dim * 4
    for program in ("prefill", "decode"):
        for key in ("temp_bytes", "argument_bytes", "output_bytes"):
            assert isinstance(out[program][key], int) and out[program][key] >= 0, (program, key)
        assert out[program]["argument_bytes"] >= out["plan"]["tower_bytes_per_device"]["llm"]
    assert out["prefill"]["output_bytes"] >= kv and out["prefill"]["temp_bytes"] > 0
    assert cli.main(argv[:-1]) == 0                                            # the tables
    text = capsys.readouterr().out
    assert "compiled on cpu (1 device), float32, attention auto: prompt 100 tokens -> 128 slots" in text
    assert text.count("MiB") >= 6 and "prefill" in text and "decode" in text


def test_compiled_prefill_memory_dense_grows_with_t_squared_blockwise_with_t():
    """XLA's temporaries of the tiny model's prefill, T = 512 → 2048: the dense kernel in one pass grows
    with T·S (its [B, N, T, S] logits), the default (blockwise, chunked) roughly with T."""
    from minicpmv_jax.compiled_plan import compiled_memory

    def temp(t, **kw):
        return compiled_memory("tiny", prompt_len=t, dtype="float32", **kw).prefill.temp_bytes

    dense = temp(2048, attention="xla", prefill_chunk=None) / temp(512, attention="xla", prefill_chunk=None)
    default = temp(2048) / temp(512)
    assert dense > 8 and default < 5, (dense, default)


def test_plan_compile_on_a_mesh_of_this_process_devices(capsys):
    """``--compile`` with ``--mesh 1x2x4`` compiles for the 8 (simulated) devices: the parameters split
    over fsdp × tensor, each device's arguments well under a quarter of one device's."""
    from minicpmv_jax import cli

    base = ["plan", "--model", "tiny", "--dtype", "float32", "--batch", "8", "--compile", "--prompt-len", "100",
            "--json"]
    assert cli.main([*base, "--mesh", "1x1x1"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--mesh", "1x2x4"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert one["devices"] == 1 and eight["devices"] == 8
    assert eight["prefill"]["argument_bytes"] < one["prefill"]["argument_bytes"] / 4
    assert eight["plan"]["param_bytes_per_device"] < one["plan"]["param_bytes_per_device"] / 4
