"""``minicpmv-jax chat`` / ``generate`` on the tiny checkpoint, the demo model, video, and bad input."""

from __future__ import annotations

import builtins
import json

import pytest

from helpers import noise_image, write_clip
from minicpmv_jax import cli
from minicpmv_jax.image_processing import load_image
from minicpmv_jax.video import load_video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    noise_image(0, 300, 200).save(d / "a.png")
    noise_image(1, 90, 120).save(d / "b.jpg")
    write_clip(d / "clip.mp4", 75, 25)  # 3 s at 25 fps → 3 frames at one per second
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


def test_a_64_frame_video_chat_on_the_demo_model(capsys, tmp_path, monkeypatch):
    """The long-context case from the command line: a 70 s clip gives 64 frames (one per second, at most
    64), each at most 2 pieces; the demo model's prompt is then thousands of tokens, prefilled by the
    default (blockwise) attention. The answer equals the Python API's on the same frames."""
    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor

    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    clip = write_clip(tmp_path / "long.mp4", 140, 2)
    code, out, err = run(capsys, "chat", "--model", "demo", "--greedy", "--max-new-tokens", 4, "--video", clip,
                         "What happens?")
    assert code == 0, err
    frames = load_video(clip)
    assert len(frames) == 64
    model = MiniCPMV.from_pretrained("demo")
    processor = MiniCPMVProcessor.from_pretrained("demo")
    msgs = [{"role": "user", "content": frames + ["What happens?"]}]
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "\n".join(["(<image>./</image>)"] * 64 + ["What happens?"])}],
        add_generation_prompt=True)
    tokens = processor([prompt], [frames], max_slice_nums=2, use_image_id=False)["input_ids"].shape[1]
    assert tokens > 2048, tokens
    want = model.chat(msgs=msgs, processor=processor, sampling=False, num_beams=1, max_new_tokens=4,
                      use_image_id=False, max_slice_nums=2)
    assert out == want + "\n"


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
    (["--greedy", "--temperature", "0.5"], "--temperature only applies when sampling (drop --greedy / --beams)"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--beams", "0"], "--beams must be an int ≥ 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an int ≥ 1, got 0"),
    (["--min-new-tokens", "-1"], "--min-new-tokens must be an int ≥ 0, got -1"),
    (["--max-slice-nums", "0"], "--max-slice-nums must be ≥ 1, got 0"),
    (["--max-frames", "0"], "--max-frames must be ≥ 1, got 0"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be ≥ 1, got 0"),
    (["--beams", "3", "--stream"], "--stream needs sampling or greedy decoding"),
    (["--image", "/nonexistent/x.png"], "x.png"),
    (["--video", "/nonexistent/v.mp4"], "v.mp4"),
])
def test_chat_bad_arguments_are_one_line_naming_the_flag(capsys, tiny_checkpoint, argv, message):
    code, _, err = run(capsys, "chat", "--model", tiny_checkpoint[0], *argv, "hi")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    python_names = ("max_new_tokens", "min_new_tokens", "top_p", "num_beams", "max_slice_nums", "max_frames",
                    "max_pixels", "stream=True", "greedy=True")
    assert not any(name in err for name in python_names), err


def test_generate_bad_batch_size_names_the_flag(capsys, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    code, _, err = run(capsys, "generate", "--model", tmp_path / "no-model", "--batch-size", 0,
                       "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl")
    assert code == 2 and "--batch-size must be ≥ 1, got 0" in err


@pytest.mark.parametrize("command", ["chat", "generate", "info", "convert", "plan", "finetune", None])
def test_help_is_plain_text(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"] if command else ["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage: minicpmv-jax" in out
    for markup in ("``", ":mod:", ":func:", ":class:", ":meth:", "`"):
        assert markup not in out, (command, markup)


def test_info_help_says_it_checks_converted_folders_too(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "converted by 'minicpmv-jax convert'" in out and "HF-format" not in out


# ---------------------------------------------------------------------------------------- empty prompts


def test_empty_prompt_without_image_or_video_is_refused(capsys, tiny_checkpoint, tiny_model, tiny_processor, files,
                                                        tmp_path):
    code, out, err = run(capsys, "chat", "--model", tmp_path / "never-loaded", "  ")
    assert code == 2 and out == "" and "empty" in err and "--image or --video" in err
    # With an image, an empty prompt is a question about the image.
    code, out, _ = run(capsys, "chat", "--model", tiny_checkpoint[0], "--greedy", "--max-new-tokens", 3,
                       "--image", files / "a.png", "")
    assert code == 0
    # The library refuses an empty last user message too, naming the conversation in a batch.
    with pytest.raises(ValueError, match="empty user message"):
        tiny_model.chat(msgs=[{"role": "user", "content": " "}], processor=tiny_processor, max_new_tokens=2)
    with pytest.raises(ValueError, match="conversation 1: the last message is an empty user message"):
        tiny_model.chat(msgs=[[{"role": "user", "content": "hi"}], [{"role": "user", "content": ["", "\n"]}]],
                        processor=tiny_processor, max_new_tokens=2)
    img = load_image(files / "a.png")
    assert isinstance(tiny_model.chat(image=img, msgs=[{"role": "user", "content": ""}], processor=tiny_processor,
                                      sampling=False, num_beams=1, max_new_tokens=2), str)


# ---------------------------------------------------------------------------------------- generate's files


def _requests(folder, *requests) -> str:
    path = folder / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def test_generate_creates_the_output_folder_and_resolves_paths_against_the_input(
        capsys, tiny_checkpoint, tiny_model, tiny_processor, files, tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "a.png").write_bytes((files / "a.png").read_bytes())
    src = _requests(data, {"id": "r", "prompt": "What is it?", "images": ["img/a.png"]})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the image path is relative to the JSONL file, not to the current folder
    dst = tmp_path / "new" / "deeper" / "answers.jsonl"
    code, _, err = run(capsys, "generate", "--model", tiny_checkpoint[0], "--dtype", "float32", "--greedy",
                       "--max-new-tokens", 4, "--input", src, "--output", dst)
    assert code == 0, err
    [line] = [json.loads(x) for x in dst.read_text().splitlines()]
    want = tiny_model.chat(msgs=[{"role": "user", "content": [load_image(files / "a.png"), "What is it?"]}],
                           processor=tiny_processor, sampling=False, num_beams=1, max_new_tokens=4)
    assert line == {"id": "r", "answer": want}
    assert "1 answered, 0 failed" in err
    assert sorted(p.name for p in dst.parent.iterdir()) == ["answers.jsonl"]  # no temporary file left


def test_generate_refuses_an_existing_output_before_any_work(capsys, tmp_path):
    src = _requests(tmp_path, {"prompt": "hi"})
    dst = tmp_path / "answers.jsonl"
    dst.write_text("precious\n")
    code, _, err = run(capsys, "generate", "--model", tmp_path / "no-such-model", "--input", src, "--output", dst)
    assert code == 2 and "already exists; pass --overwrite to replace it" in err
    assert "no-such-model" not in err and dst.read_text() == "precious\n"
    code, _, err = run(capsys, "generate", "--model", "m", "--input", src, "--output", src, "--overwrite")
    assert code == 2 and "is the --input file" in err
    code, _, err = run(capsys, "generate", "--model", "m", "--input", src, "--output", tmp_path)
    assert code == 2 and "is a folder" in err


def test_a_failed_generate_leaves_nothing_behind(capsys, tmp_path):
    """Refused or failed: an existing output is unchanged, and a folder made for the output is gone."""
    src = _requests(tmp_path, {"prompt": "hi"})
    dst = tmp_path / "answers.jsonl"
    dst.write_text("precious\n")
    code, _, err = run(capsys, "generate", "--model", tmp_path / "no-such-model", "--input", src, "--output", dst,
                       "--overwrite")
    assert code == 2 and "no-such-model" in err and dst.read_text() == "precious\n"
    code, _, _ = run(capsys, "generate", "--model", tmp_path / "no-such-model", "--input", src,
                     "--output", tmp_path / "made" / "for" / "it.jsonl")
    assert code == 2 and not (tmp_path / "made").exists()
    (tmp_path / "empty.jsonl").write_text("\n\n")
    code, _, err = run(capsys, "generate", "--model", "m", "--input", tmp_path / "empty.jsonl", "--output",
                       tmp_path / "x.jsonl")
    assert code == 2 and "no requests" in err and not (tmp_path / "x.jsonl").exists()


def test_generate_overwrites_only_when_asked_and_reports_failures(capsys, tiny_checkpoint, files, tmp_path):
    src = _requests(tmp_path, {"id": 1, "prompt": "x", "images": ["missing.png"]}, {"id": 2, "prompt": " "})
    dst = tmp_path / "answers.jsonl"
    dst.write_text("old\n")
    args = ["generate", "--model", tiny_checkpoint[0], "--dtype", "float32", "--greedy", "--max-new-tokens", 2,
            "--input", src, "--output", dst, "--overwrite"]
    code, _, err = run(capsys, *args)
    assert code == 1, err  # every request failed
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [x["id"] for x in lines] == [1, 2] and all("error" in x for x in lines)
    assert str(tmp_path / "missing.png") in lines[0]["error"]
    assert "'prompt' is empty" in lines[1]["error"]
    assert "all 2 requests failed" in err
    # One answered, one failed: status 0, and the count is said.
    (tmp_path / "a.png").write_bytes((files / "a.png").read_bytes())
    _requests(tmp_path, {"id": 1, "prompt": "x", "images": ["a.png"]}, {"id": 2, "prompt": ""})
    code, _, err = run(capsys, *args)
    assert code == 0 and "1 answered, 1 failed" in err


def test_paths_expand_the_home_folder(capsys, tiny_checkpoint, files, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / "ckpt").symlink_to(tiny_checkpoint[0])
    (home / "a.png").write_bytes((files / "a.png").read_bytes())
    _requests(home, {"id": "r", "prompt": "hi", "images": ["~/a.png"]})
    common = ["--model", "~/ckpt", "--dtype", "float32", "--greedy", "--max-new-tokens", 2]
    code, _, err = run(capsys, "generate", *common, "--input", "~/requests.jsonl", "--output=~/out/answers.jsonl")
    assert code == 0, err
    assert "answer" in json.loads((home / "out" / "answers.jsonl").read_text())
    code, out, err = run(capsys, "chat", *common, "--image=~/a.png", "hi")
    assert code == 0 and out.strip(), err
    code, out, err = run(capsys, "info", "--model=~/ckpt")
    assert code == 0 and ": OK" in out, err


# ---------------------------------------------------------------------------------------- big images


def test_max_image_pixels_is_a_flag(capsys, tiny_checkpoint, files):
    code, _, err = run(capsys, "chat", "--model", tiny_checkpoint[0], "--max-image-pixels", 50_000,
                       "--image", files / "a.png", "hi")  # 300x200 = 60,000 pixels
    assert code == 2 and "60,000 pixels, more than the limit of 50,000 (--max-image-pixels)" in err
    assert "raise --max-image-pixels to accept it" in err and "max_pixels" not in err
    code, _, err = run(capsys, "chat", "--model", tiny_checkpoint[0], "--max-image-pixels", 60_000, "--greedy",
                       "--max-new-tokens", 2, "--image", files / "a.png", "hi")
    assert code == 0, err


def test_a_large_image_gets_one_line_of_ours_not_pils_warning(capsys, tmp_path):
    """A 100-megapixel image (above PIL's warning threshold): one warning line of ours, PIL's guard is
    restored afterwards, and PIL's own DecompressionBombWarning never fires."""
    import warnings

    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000)).save(big)
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(capsys, "chat", "--model", tmp_path / "no-model", "--image", big, "hi")
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    warning, error = err.strip().splitlines()  # loaded with a warning, then the (missing) model stops it
    assert warning.startswith("minicpmv-jax chat: warning: image") and "100,000,000 pixels" in warning
    assert "site-packages" not in err and code == 2 and "no-model" in error


def test_convert_demo_gives_a_small_checkpoint_to_try(capsys, tmp_path, monkeypatch):
    """`convert demo DST`: the README's way to try conversion without downloading 16 GB."""
    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    code, out, err = run(capsys, "convert", "demo", tmp_path / "demo-orbax")
    assert code == 0, err
    assert "converted    demo ->" in out
    code, out, err = run(capsys, "info", "--model", tmp_path / "demo-orbax")
    assert code == 0 and "converted (Orbax)" in out, err


def test_a_hub_id_is_downloaded_and_converted_once(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    from minicpmv_jax.hub import converted_cache_dir
    from minicpmv_jax.orbax_checkpoint import is_converted

    monkeypatch.setenv("MINICPMV_JAX_CACHE", str(tmp_path / "cache"))
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: downloads.append(repo_id) or tiny_checkpoint[0])
    argv = ("chat", "--model", "someone/tiny", "--dtype", "float32", "--greedy", "--max-new-tokens", 3, "hi")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert downloads == ["someone/tiny"] and is_converted(converted_cache_dir("someone/tiny"))
    code, again, err = run(capsys, *argv)
    assert code == 0 and again == out and downloads == ["someone/tiny"], err  # the converted folder, no download
