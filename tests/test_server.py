"""The OpenAI-compatible server, as users run it: ``minicpmv-jax serve`` in its own process, on a free port
of 127.0.0.1, driven with OpenAI's own client (raw HTTP where the client cannot send the request).

Two servers on the tiny checkpoint: the main one (module-scoped: most tests share it) with an API key, a
folder for ``file://`` media and small media limits, and a one-slot, one-place-queue server for the queue
(429) and the SIGTERM drain. Answers are checked against ``model.chat`` in this process: greedy answers
are the same tokens whatever else the server is doing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers import noise_image, write_clip  # noqa: E402

KEY = "test-key"
NAME = "tiny-minicpmv"
MAX_LEN = 512


# ---------------------------------------------------------------------------------------- servers


class Server:
    """A ``minicpmv-jax serve`` process; its log in a file (a pipe nobody reads would block it)."""

    def __init__(self, checkpoint: str, log_path, *flags: str, env: dict | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        env = dict(env or os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minicpmv_jax.cli", "serve", "--model", checkpoint, "--dtype", "float32",
             "--host", "127.0.0.1", "--port", "0", "--served-model-name", NAME, *flags],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.url = self._wait_ready(timeout=240)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.log()[-4000:]}"
            if url is None:
                m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", self.log())
                url = m and m.group(1)
            if url is not None:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            return url
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.3)
        raise AssertionError(f"the server was not ready in {timeout} s:\n{self.log()[-4000:]}")

    def get(self, path: str) -> tuple[int, bytes, Any]:
        return _http(self.url + path)

    def health(self) -> dict:
        return json.loads(self.get("/health")[1])

    def client(self, key: str = KEY, timeout: float = 120) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _http(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, Any]:
    """(status, body, headers) of a raw request, errors included; header names are case-insensitive."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """The folder ``file://`` URLs may read: an image inside, a symlink leading out, and a file outside."""
    root = tmp_path_factory.mktemp("media")
    inside, outside = root / "allowed", root / "outside"
    inside.mkdir()
    outside.mkdir()
    noise_image(5, 56, 42).save(inside / "photo.png")
    noise_image(6, 56, 42).save(outside / "secret.png")
    (inside / "escape.png").symlink_to(outside / "secret.png")
    return inside, outside


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_dir, tmp_path_factory):
    s = Server(tiny_checkpoint[0], tmp_path_factory.mktemp("server") / "serve.log", "--api-key", KEY,
               "--max-batch", "4", "--max-len", str(MAX_LEN), "--allowed-local-media", str(media_dir[0]),
               "--max-images", "3", "--max-image-pixels", "1000000", "--max-image-bytes", "200000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint, tmp_path_factory):
    """One slot, one place in the queue, room for long answers."""
    s = Server(tiny_checkpoint[0], tmp_path_factory.mktemp("small") / "serve.log", "--max-batch", "1",
               "--max-queue", "1", "--max-len", "2048", "--drain-timeout", "60")
    yield s
    s.stop()


# ---------------------------------------------------------------------------------------- helpers


def _png_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _reference(model, processor, content, max_new_tokens, repetition_penalty=1.0, **options) -> str:
    return model.chat(msgs=[{"role": "user", "content": content}], processor=processor, sampling=False,
                      num_beams=1, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, **options)


def _greedy(client, messages, max_tokens, **extra):
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body=extra or None)


def _error(call, status: int):
    """The OpenAI error a call raises, checked to carry ``status``."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value
    return info.value


# ---------------------------------------------------------------------------------------- answers


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert server.client().models.retrieve(NAME).id == NAME
    assert server.health()["status"] == "ok"


def test_image_chat_equals_model_chat(server, tiny_model, tiny_processor):
    image = noise_image(1, 60, 40)
    messages = _user(_image_part(_png_url(image)), {"type": "text", "text": "What is in the picture?"})
    got = _greedy(server.client(), messages, 12, repetition_penalty=1.2)
    want = _reference(tiny_model, tiny_processor, [image, "What is in the picture?"], 12, repetition_penalty=1.2)
    assert got.object == "chat.completion" and got.model == NAME
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    assert got.usage.completion_tokens <= 12 and got.usage.total_tokens == got.usage.prompt_tokens + \
        got.usage.completion_tokens


def test_video_chat_follows_the_video_recipe(server, tiny_model, tiny_processor, tmp_path):
    from minicpmv_jax.video import load_video

    clip = write_clip(tmp_path / "clip.mp4", 75, 25)          # 3 s at 25 fps: 3 frames
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    messages = _user({"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Describe it."})
    got = _greedy(server.client(), messages, 8)
    want = _reference(tiny_model, tiny_processor, [*load_video(str(clip)), "Describe it."], 8,
                      use_image_id=False, max_slice_nums=2)
    assert got.choices[0].message.content == want


def test_stream_equals_whole_answer_with_usage(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."},
                {"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "Go on."}]
    whole = _greedy(client, messages, 16)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_concurrent_requests_each_equal_their_single_answer(server, tiny_model, tiny_processor):
    image = noise_image(2, 50, 70)
    jobs = []
    for k in range(16):
        text = f"Question {k}: " + "tell me more " * (k % 5 * 6)
        content = [image, text] if k % 7 == 3 else [text]
        jobs.append((content, 4 + (k * 5) % 21))
    results: dict[int, object] = {}

    def ask(k: int) -> None:
        content, n = jobs[k]
        parts = [_image_part(_png_url(p)) if not isinstance(p, str) else {"type": "text", "text": p}
                 for p in content]
        try:
            results[k] = _greedy(server.client(), _user(*parts), n).choices[0].message.content
        except Exception as e:  # noqa: BLE001 — reported below
            results[k] = e

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for k, (content, n) in enumerate(jobs):
        assert results.get(k) == _reference(tiny_model, tiny_processor, content, n), (k, results.get(k))


def test_seeded_sampling_is_reproducible(server):
    client = server.client()

    def sample(seed: int, n: int):
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say something."}],
                                             max_tokens=10, temperature=0.9, top_p=0.95, seed=seed, n=n)
        assert [c.index for c in out.choices] == list(range(n))
        return [c.message.content for c in out.choices]

    first = sample(7, 2)
    assert sample(7, 2) == first
    assert first[0] != first[1]
    assert sample(8, 1) == first[1:]          # choice i samples with seed + i


def test_stop_strings_and_max_tokens(server):
    client = server.client()
    messages = [{"role": "user", "content": "Count."}]
    whole = _greedy(client, messages, 20)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 20
    stop = text[len(text) // 2:len(text) // 2 + 3].strip() or text[-2:]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                         stop=[stop, "zzzq"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)].strip()
    assert cut.usage.completion_tokens < 20


def test_completions_endpoint(server, tiny_model, tiny_processor):
    from minicpmv_jax import GenerationConfig
    from minicpmv_jax.chat import answer_ids
    from minicpmv_jax.generate import generate, prepare_batch
    from minicpmv_jax.host import fetch

    prompt = "The capital of France is"
    client = server.client()
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    stop_ids = tuple(tiny_processor.tokenizer.stop_ids)
    out = generate(tiny_model, prepare_batch(tiny_model, tiny_processor([prompt])),
                   GenerationConfig(max_new_tokens=10), stop_ids)
    ids = answer_ids(fetch(out.tokens)[0], int(fetch(out.lengths)[0]), stop_ids)
    assert got.object == "text_completion"
    assert got.choices[0].text == tiny_processor.tokenizer.decode(ids).strip()
    assert got.usage.prompt_tokens == len(tiny_processor.tokenizer.encode(prompt))
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got.choices[0].text
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_file_urls_inside_the_allowed_folder(server, media_dir, tiny_model, tiny_processor):
    from PIL import Image

    inside, _ = media_dir
    messages = _user(_image_part((inside / "photo.png").as_uri()), {"type": "text", "text": "Hi"})
    got = _greedy(server.client(), messages, 6)
    want = _reference(tiny_model, tiny_processor, [Image.open(inside / "photo.png").convert("RGB"), "Hi"], 6)
    assert got.choices[0].message.content == want


# ---------------------------------------------------------------------------------------- slots and metrics


def test_cancelling_a_stream_frees_its_slot(server):
    client = server.client()
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Write a lot."}],
                                            max_tokens=MAX_LEN - 40, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    deadline = time.monotonic() + 15
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.health() == {"status": "ok", "queued": 0, "running": 0}
    metrics = server.get("/metrics")[1].decode()
    assert re.search(r'minicpmv_completions_total\{finish_reason="cancelled"\} [1-9]', metrics)
    assert _greedy(client, [{"role": "user", "content": "Still there?"}], 3).choices[0].finish_reason == "length"


def test_metrics(server):
    _greedy(server.client(), [{"role": "user", "content": "Hello"}], 5)
    status, body, headers = server.get("/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}
    assert values["minicpmv_queue_length"] == 0 and values["minicpmv_running_slots"] == 0
    assert values["minicpmv_generated_tokens_total"] >= 5
    assert values["minicpmv_time_to_first_token_seconds_count"] >= 1
    assert values["minicpmv_time_per_output_token_seconds_count"] >= 4
    assert values['minicpmv_http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values['minicpmv_completions_total{finish_reason="length"}'] >= 1
    assert re.search(r"minicpmv_jax.server: request chatcmpl-\w+-0: prompt \d+ tokens, completion 5 tokens, "
                     r"ttft [\d.]+ s, duration [\d.]+ s, finish length", server.log())


# ---------------------------------------------------------------------------------------- errors


def test_every_bad_input_is_a_clear_error_and_the_server_keeps_serving(server, media_dir):
    from PIL import Image

    client = server.client()
    inside, outside = media_dir

    def chat(**kw):
        body = dict(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        body.update(kw)
        return lambda: client.chat.completions.create(**body)

    def bad(call, param=None, code=None, words=""):
        e = _error(call, 400)
        assert e.body["type"] == "invalid_request_error"
        assert param is None or e.body["param"] == param, e.body
        assert code is None or e.body["code"] == code, e.body
        assert words in e.body["message"], e.body
        assert "Traceback" not in e.body["message"]

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, body, _ = _http(server.url + "/v1/chat/completions", b'{"model": "x", "messages": [', headers)
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, body, _ = _http(server.url + "/v1/chat/completions", b'[1, 2]', headers)
    assert status == 400 and "JSON object" in json.loads(body)["error"]["message"]

    hi = {"type": "text", "text": "Hi"}
    bad(chat(messages=_user({"type": "input_audio", "input_audio": {}})), "messages[0].content[0].type")
    bad(chat(messages=_user(hi, {"type": "image_url"})), "messages[0].content[1].image_url")
    bad(chat(messages=_user(_image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode()))),
        "messages[0].content[0].image_url.url", "invalid_image")
    bad(chat(messages=_user(_image_part("data:image/png;base64,@@@@"))), "messages[0].content[0].image_url.url")
    flat = Image.new("RGB", (1001, 1000), (20, 120, 220))   # a small file of many pixels
    bad(chat(messages=_user(_image_part(_png_url(flat)))), code="image_too_large", words="--max-image-pixels")
    bad(chat(messages=_user(_image_part(_png_url(noise_image(4, 300, 300))))), code="image_too_large",
        words="--max-image-bytes")
    small = _image_part(_png_url(noise_image(1, 30, 30)))
    bad(chat(messages=_user(small, small, small, small, hi)), "messages", "too_many_images")
    bad(chat(messages=_user(_image_part("https://example.com/cat.png"))), code="remote_url_refused")
    bad(chat(messages=_user(_image_part((outside / "secret.png").as_uri()))), code="local_file_refused")
    bad(chat(messages=_user(_image_part((inside / "escape.png").as_uri()))), code="local_file_refused")
    bad(chat(messages=_user(_image_part((inside / ".." / "outside" / "secret.png").as_uri()))),
        code="local_file_refused")
    bad(chat(max_tokens=MAX_LEN), "max_tokens", "context_length_exceeded")
    bad(chat(messages=[{"role": "user", "content": "word " * MAX_LEN}]), "messages", "context_length_exceeded")
    bad(chat(max_tokens=0), "max_tokens")
    bad(chat(max_tokens=-3), "max_tokens")
    bad(lambda: client.completions.create(model=NAME, prompt="Hi", max_tokens=0), "max_tokens")
    bad(chat(frequency_penalty=0.5), "frequency_penalty", "unsupported_parameter")
    bad(chat(presence_penalty=-1.0), "presence_penalty")
    bad(chat(temperature=-1), "temperature")
    bad(chat(top_p=1.5), "top_p")
    bad(chat(n=0), "n")
    bad(chat(stop=[""]), "stop[0]")
    bad(chat(messages=[]), "messages")
    bad(chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role")
    bad(chat(messages=[{"role": "system", "content": "Only a system prompt."}]), "messages")
    bad(chat(messages=[{"role": "assistant", "content": "I start."}]), "messages", words="first message")
    bad(chat(extra_body={"top_k": "ten"}), "top_k")
    bad(chat(extra_body={"max_slice_nums": 0}), "max_slice_nums")
    bad(chat(logprobs=True), "logprobs", "unsupported_parameter")

    wrong = server.client(key="wrong")
    assert _error(lambda: wrong.models.list(), 401).body["code"] == "invalid_api_key"
    assert _http(server.url + "/v1/models")[0] == 401                     # no key at all
    assert _error(chat(model="gpt-4o"), 404).body["code"] == "model_not_found"

    ok = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                        presence_penalty=0, frequency_penalty=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert server.health()["status"] == "ok" and "Traceback" not in server.log()


# ---------------------------------------------------------------------------------------- queue and shutdown


def test_a_full_queue_is_a_429(small_server):
    client = small_server.client()
    long = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Go."}],
                                          max_tokens=2000, temperature=0, stream=True)
    for chunk in long:                                      # its first token: it holds the slot
        if chunk.choices and chunk.choices[0].delta.content:
            break
    waiting: dict[str, object] = {}
    queued = threading.Thread(target=lambda: waiting.setdefault("answer", _greedy(client, _user(
        {"type": "text", "text": "Me next."}), 3)))
    queued.start()
    deadline = time.monotonic() + 30
    while small_server.health()["queued"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small_server.health() == {"status": "ok", "queued": 1, "running": 1}
    e = _error(lambda: _greedy(client, _user({"type": "text", "text": "And me."}), 3), 429)
    assert e.body["code"] == "queue_full" and e.body["type"] == "rate_limit_error"
    long.close()                                            # frees the slot for the queued request
    queued.join(timeout=60)
    assert waiting["answer"].choices[0].finish_reason == "length"


def test_a_client_gone_before_its_whole_answer_cancels_it(small_server):
    before = small_server.log().count("finish cancelled")
    impatient = small_server.client(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        _greedy(impatient, [{"role": "user", "content": "A long one."}], 2000)
    deadline = time.monotonic() + 15
    while small_server.log().count("finish cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert small_server.log().count("finish cancelled") == before + 1
    # the engine frees the slot at its next step
    while small_server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small_server.health() == {"status": "ok", "queued": 0, "running": 0}


def test_sigterm_drains_in_flight_requests_and_exits_0(small_server):
    client = small_server.client()
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Go on."}],
                                            max_tokens=300, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = [next(iter(stream))]
    small_server.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 300
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert small_server.proc.wait(timeout=60) == 0
    log = small_server.log()
    assert "engine stopped" in log and "Traceback" not in log


# ---------------------------------------------------------------------------------------- the command line


def test_serve_help_and_flag_errors_before_loading(capsys, tmp_path):
    from minicpmv_jax import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "--allowed-local-media" in out and "`" not in out
    never = str(tmp_path / "never-loaded")
    for flags, words in ((["--max-batch", "0"], "--max-batch must be an int ≥ 1, got 0"),
                         (["--max-images", "0"], "--max-images must be an int ≥ 1, got 0"),
                         (["--prefill-chunk", "100"], "--prefill-chunk must be a power of two"),
                         (["--allowed-local-media", never], f"--allowed-local-media {never}: not an existing folder"),
                         (["--port", "70000"], "--port must be in 0..65535")):
        assert cli.main(["serve", "--model", never, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_serve_on_two_processes(tiny_checkpoint, tiny_model, tiny_processor, tmp_path):
    """``--coordinator``: process 0 serves HTTP, process 1 follows its engine on a mesh over both; the
    answers are those of one process, and SIGTERM to both lets process 0 drain, then both exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    cluster = ["--mesh", "1x4x2", "--coordinator", coordinator, "--num-processes", "2", "--max-batch", "2",
               "--max-len", "256"]
    with open(tmp_path / "follower.log", "wb") as follower_log:
        follower = subprocess.Popen(
            [sys.executable, "-m", "minicpmv_jax.cli", "serve", "--model", tiny_checkpoint[0], "--dtype", "float32",
             *cluster, "--process-id", "1"], stdout=follower_log, stderr=subprocess.STDOUT, env=env)
        leader = None
        try:
            leader = Server(tiny_checkpoint[0], tmp_path / "leader.log", *cluster, "--process-id", "0", env=env)
            content = ["Hello from two hosts."]
            part = {"type": "text", "text": content[0]}
            answers = [_greedy(leader.client(), _user(part), n).choices[0].message.content for n in (5, 9)]
            assert answers == [_reference(tiny_model, tiny_processor, content, n) for n in (5, 9)]
            follower.send_signal(signal.SIGTERM)       # ignored: the follower waits for process 0
            time.sleep(0.5)
            assert follower.poll() is None
        finally:
            if leader is not None:
                leader.stop()
                assert leader.proc.returncode == 0, leader.log()[-3000:]
            try:
                assert follower.wait(timeout=120) == 0, (tmp_path / "follower.log").read_text()[-3000:]
            finally:
                if follower.poll() is None:
                    follower.kill()
                    follower.wait()
