"""``minicpmv-jax chat`` / ``generate`` on the tiny checkpoint, the demo model, video, and bad input."""

from __future__ import annotations

import builtins
import json

import pytest

from minicpmv_jax import cli
from minicpmv_jax.image_processing import load_image
from minicpmv_jax.video import load_video
from test_model_parity import noise_image
from test_video import _write_clip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    noise_image(0, 300, 200).save(d / "a.png")
    noise_image(1, 90, 120).save(d / "b.jpg")
    _write_clip(d / "clip.mp4", 75, 25)  # 3 s at 25 fps → 3 frames at one per second
    (d / "broken.mp4").write_bytes(b"not a video at all")
    return d


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_chat_greedy_matches_the_python_api(capsys, tiny_checkpoint, tiny_model, tiny_processor, files):
    folder = tiny_checkpoint[0]
    code, out, _ = run(capsys, "chat", "--model", folder, "--dtype", "float32", "--greedy", "--max-new-tokens", 6,
                       "--image", files / "a.png", "--system", "Be brief.", "What is this?")
    assert code == 0
    msgs = [{"role": "user", "content": [load_image(files / "a.png"), "What is this?"]}]
    want = tiny_model.chat(msgs=msgs, processor=tiny_processor, sampling=False, num_beams=1, max_new_tokens=6,
                           system_prompt="Be brief.")
    assert out == want + "\n"
    code, streamed, _ = run(capsys, "chat", "--model", folder, "--dtype", "float32", "--greedy",
                            "--max-new-tokens", 6, "--image", files / "a.png", "--system", "Be brief.", "--stream",
                            "What is this?")
    assert code == 0 and streamed == out


def test_chat_video_uses_frames_without_image_ids(capsys, tiny_checkpoint, tiny_model, tiny_processor, files):
    code, out, _ = run(capsys, "chat", "--model", tiny_checkpoint[0], "--dtype", "float32", "--beams", 2,
                       "--max-new-tokens", 4, "--video", files / "clip.mp4", "Describe the video.")
    assert code == 0
    frames = load_video(files / "clip.mp4")
    assert len(frames) == 3
    want = tiny_model.chat(msgs=[{"role": "user", "content": frames + ["Describe the video."]}],
                           processor=tiny_processor, sampling=False, num_beams=2, max_new_tokens=4,
                           use_image_id=False, max_slice_nums=2)
    assert out == want + "\n"


def test_generate_jsonl(capsys, tiny_checkpoint, tiny_model, tiny_processor, files, tmp_path):
    requests = [
        {"id": "q1", "prompt": "Hello?"},
        {"id": "q2", "prompt": "What is it?", "images": [str(files / "a.png"), str(files / "b.jpg")]},
        "this line is not JSON",
        {"id": "q4", "prompt": "x", "images": [str(files / "missing.png")]},
        {"id": "q5", "prompt": "Video?", "video": str(files / "broken.mp4")},
        {"prompt": 3},
        {"id": "q7", "prompt": "Last one", "system": "Answer in French."},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in requests) + "\n\n")
    dst = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "generate", "--model", tiny_checkpoint[0], "--dtype", "float32", "--greedy",
                       "--max-new-tokens", 5, "--batch-size", 3, "--input", src, "--output", dst)
    assert code == 0
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [x.get("id") for x in lines] == ["q1", "q2", 3, "q4", "q5", 6, "q7"]
    assert "not valid JSON" in lines[2]["error"]
    assert "missing.png" in lines[3]["error"]
    assert "broken.mp4" in lines[4]["error"]
    assert "'prompt' must be a string" in lines[5]["error"]
    assert "3 answered, 4 failed" in err
    # Answers equal the Python API's, request by request.
    kw = dict(processor=tiny_processor, sampling=False, num_beams=1, max_new_tokens=5)
    assert lines[0]["answer"] == tiny_model.chat(msgs=[{"role": "user", "content": ["Hello?"]}], **kw)
    imgs = [load_image(files / "a.png"), load_image(files / "b.jpg")]
    assert lines[1]["answer"] == tiny_model.chat(msgs=[{"role": "user", "content": imgs + ["What is it?"]}], **kw)
    assert lines[6]["answer"] == tiny_model.chat(msgs=[{"role": "user", "content": ["Last one"]}],
                                                 system_prompt="Answer in French.", **kw)


def test_demo_model_runs_offline_and_says_so(capsys, tmp_path, monkeypatch, files):
    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    code, out, err = run(capsys, "chat", "--model", "demo", "--max-new-tokens", 4, "--seed", 1,
                         "--image", files / "a.png", "hi")
    assert code == 0 and "RANDOM weights" in err and "noise" in err
    assert (tmp_path / "cache" / "demo-v1" / "config.json").is_file()
    code2, out2, _ = run(capsys, "chat", "--model", "demo", "--max-new-tokens", 4, "--seed", 1,
                         "--image", files / "a.png", "hi")
    assert code2 == 0 and out2 == out  # cached checkpoint, same seed, same answer


def test_hub_id_without_huggingface_hub_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub" or name.startswith("huggingface_hub."):
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    code, _, err = run(capsys, "chat", "--model", "openbmb/MiniCPM-V-2_6", "hi")
    assert code == 2
    assert "openbmb/MiniCPM-V-2_6" in err and "hub" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--greedy", "--temperature", "0.5"], "--temperature only applies when sampling"),
    (["--top-p", "1.5"], "top_p"),
    (["--beams", "0"], "num_beams"),
    (["--image", "/nonexistent/x.png"], "x.png"),
    (["--video", "/nonexistent/v.mp4"], "v.mp4"),
])
def test_chat_bad_arguments_are_one_line(capsys, tiny_checkpoint, argv, message):
    code, _, err = run(capsys, "chat", "--model", tiny_checkpoint[0], "--max-new-tokens", 2, *argv, "hi")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
