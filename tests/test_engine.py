"""The serving engine without HTTP: answers equal to ``chat`` alone or in company, seeds, one compiled
decode step, chunked prefill between decode steps, cancellation, the queue, stop strings, a mesh, the thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from helpers import noise_image
from minicpmv_jax import generate as gen
from minicpmv_jax import sharding
from minicpmv_jax.engine import (Engine, EngineConfig, EngineStopped, QueueFull, Request, request_from_messages)
from minicpmv_jax.engine import slots as engine_slots
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generation_config import GenerationConfig

GREEDY = dict(sampling=False, num_beams=1)


def user(*content):
    return {"role": "user", "content": list(content) if len(content) > 1 else content[0]}


@pytest.fixture(scope="module")
def conversations():
    """Mixed prompts: images of different sizes (different piece counts), text of different lengths,
    a multi-turn conversation."""
    a, b = noise_image(10, 300, 200), noise_image(11, 64, 90)
    return [
        [user(a, "What is in this picture?")],
        [user("Hi.")],
        [user("Tell me a long story about " + "a very small cat " * 12)],
        [user(b, "Describe it.")],
        [user(a, "What is it?"), {"role": "assistant", "content": "A cat."}, user(b, "And this one?")],
        [user("Count to ten.")],
    ]


def _requests(processor, conversations, lengths, **kw):
    return [request_from_messages(processor, c, GenerationConfig.for_chat(max_new_tokens=n, **kw))
            for c, n in zip(conversations, lengths)]


def _run(engine, requests):
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()
    return [h.result() for h in handles]


def test_greedy_answers_equal_chat_alone_and_in_company(tiny_model, tiny_processor, conversations):
    """Six requests of mixed lengths through three slots (so some wait and take a freed slot) give each
    the answer ``model.chat`` gives for it alone; token ids too."""
    lengths = [12, 5, 20, 9, 16, 3]
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=3, max_len=512))
    got = _run(engine, _requests(tiny_processor, conversations, lengths, **GREEDY))
    for conv, n, out in zip(conversations, lengths, got):
        want = tiny_model.chat(msgs=conv, processor=tiny_processor, max_new_tokens=n, **GREEDY)
        assert out.text == want
        assert out.finish_reason in ("stop", "length") and out.completion_tokens == len(out.token_ids)
        assert out.finish_reason == "length" or out.token_ids[-1] in tiny_processor.tokenizer.stop_ids
        assert out.completion_tokens <= n and (out.finish_reason != "length" or out.completion_tokens == n)
    alone = _run(engine, _requests(tiny_processor, conversations[:1], lengths[:1], **GREEDY))[0]
    assert alone.token_ids == got[0].token_ids
    assert engine.idle() and engine.stats().running == 0


def test_seeded_sampling_is_reproducible_and_independent_of_company(tiny_model, tiny_processor, conversations):
    lengths = [10] * 4
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=4, max_len=512))
    kw = dict(sampling=True, seed=7)
    together = _run(engine, _requests(tiny_processor, conversations[:4], lengths, **kw))
    alone = [_run(engine, _requests(tiny_processor, [c], [10], **kw))[0] for c in conversations[:4]]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    # a request alone in the engine draws what chat draws with the same seed
    assert together[1].text == tiny_model.chat(msgs=conversations[1], processor=tiny_processor, max_new_tokens=10,
                                               **kw)
    other_seed = _run(engine, _requests(tiny_processor, conversations[:1], [10], sampling=True, seed=8))[0]
    assert other_seed.token_ids != together[0].token_ids


def test_thirty_mixed_requests_compile_the_decode_step_once(tiny_model, tiny_processor, conversations):
    """Greedy and sampled requests, different lengths, images or not, different settings: one program."""
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=4, max_len=400))  # a fresh cache shape
    before = engine_slots.decode_step._cache_size()
    rng = np.random.default_rng(0)
    requests = []
    for i in range(30):
        conv = conversations[i % len(conversations)]
        kw = dict(sampling=True, seed=i, temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 50)),
                  top_p=float(rng.uniform(0.5, 1.0))) if i % 2 else dict(GREEDY, repetition_penalty=1.1)
        requests.append(request_from_messages(tiny_processor, conv, GenerationConfig.for_chat(
            max_new_tokens=int(rng.integers(1, 12)), **kw)))
    out = _run(engine, requests)
    assert all(o.finish_reason in ("stop", "length") for o in out)
    assert engine_slots.decode_step._cache_size() - before == 1


def test_long_prompt_is_prefilled_between_decode_steps(tiny_model, tiny_processor, conversations):
    """With 16-token chunks a long prompt takes several scheduler iterations, and the running request gets
    a token in each; the chunked prefill gives the tokens of generate's chunked prefill."""
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=2, max_len=512, prefill_chunk=16))
    running = engine.submit(_requests(tiny_processor, conversations[1:2], [40], **GREEDY)[0])
    engine.step()
    engine.step()
    long_request = _requests(tiny_processor, conversations[2:3], [8], **GREEDY)[0]
    assert long_request.prompt_tokens > 64
    long_handle = engine.submit(long_request)
    tokens, chunks = [], 0
    engine.step()
    while engine._prefill is not None:
        chunks += 1
        before = running.completion_tokens
        engine.step()
        tokens.append(running.completion_tokens - before)
    assert chunks >= 3 and all(t == 1 for t in tokens[:chunks])
    engine.run_until_idle()
    got = long_handle.result()
    prepared = gen.prepare_batch(tiny_model, long_request.prompt)
    config = long_request.config
    out = gen.generate(tiny_model, prepared, config, tiny_processor.tokenizer.stop_ids, prefill_chunk=16)
    want = [int(t) for t in np.asarray(out.tokens)[0, :int(np.asarray(out.lengths)[0])]]
    assert list(got.token_ids) == want
    assert running.result().finish_reason in ("stop", "length")


def test_a_prompt_shifted_to_fit_the_cache_gives_the_same_answer(tiny_model, tiny_processor, conversations):
    """A 128-token bucket + 40 new tokens do not fit 160 slots as the compiled loop lays them out: the
    prompt moves left over its own padding, and the answer is unchanged."""
    request = _requests(tiny_processor, conversations[2:3], [40], **GREEDY)[0]
    length = request.prompt_tokens
    assert 64 < length <= 120
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=2, max_len=length + 40))
    got = _run(engine, [request])[0]
    assert got.text == tiny_model.chat(msgs=conversations[2], processor=tiny_processor, max_new_tokens=40, **GREEDY)


def test_cancel_frees_the_slot(tiny_model, tiny_processor, conversations):
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=1, max_len=256))
    first = engine.submit(_requests(tiny_processor, conversations[1:2], [100], **GREEDY)[0])
    waiting = engine.submit(_requests(tiny_processor, conversations[5:6], [4], **GREEDY)[0])
    for _ in range(4):
        engine.step()
    assert first.completion_tokens >= 2 and waiting.completion_tokens == 0
    first.cancel()
    engine.run_until_idle()
    assert first.finish_reason == "cancelled" and first.completion_tokens < 10
    assert waiting.result().text == tiny_model.chat(msgs=conversations[5], processor=tiny_processor,
                                                    max_new_tokens=4, **GREEDY)
    queued = engine.submit(_requests(tiny_processor, conversations[1:2], [4], **GREEDY)[0])
    queued.cancel()
    engine.run_until_idle()
    assert queued.finish_reason == "cancelled" and queued.completion_tokens == 0
    # the same request submitted twice: cancelling one submission leaves the other
    twice = _requests(tiny_processor, conversations[5:6], [4], **GREEDY)[0]
    first, second = engine.submit(twice), engine.submit(twice)
    first.cancel()
    engine.run_until_idle()
    assert first.finish_reason == "cancelled" and second.result().finish_reason in ("stop", "length")


def test_refusals(tiny_model, tiny_processor, conversations):
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=1, max_len=64, max_queue=2))
    with pytest.raises(ArgumentError, match="prompt.*max_len of 64"):
        engine.submit(_requests(tiny_processor, conversations[2:3], [8], **GREEDY)[0])
    with pytest.raises(ArgumentError, match="num_beams"):
        engine.submit(_requests(tiny_processor, conversations[1:2], [4], sampling=False)[0])
    with pytest.raises(ArgumentError, match="input_ids"):
        engine.submit(Request(prompt=tiny_processor(["a", "b"]), config=GenerationConfig(max_new_tokens=2)))
    short = _requests(tiny_processor, conversations[1:2], [4], **GREEDY)[0]
    handles = [engine.submit(short), engine.submit(short)]
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(short)
    engine.run_until_idle()
    assert [h.result().text for h in handles] == [handles[0].result().text] * 2
    for name, value in (("max_batch", 0), ("max_len", 8), ("prefill_chunk", 24), ("max_queue", True)):
        with pytest.raises(ArgumentError, match=name):
            EngineConfig(**{name: value})


def test_stop_strings_cut_the_answer(tiny_model, tiny_processor, conversations):
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=2, max_len=256))
    full = _run(engine, _requests(tiny_processor, conversations[:1], [16], **GREEDY))[0]
    cut_at = full.text[3:6]
    request = request_from_messages(tiny_processor, conversations[0],
                                    GenerationConfig.for_chat(max_new_tokens=16, **GREEDY), stop=[cut_at])
    got = _run(engine, [request])[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[:full.text.index(cut_at)].strip()
    assert got.completion_tokens < full.completion_tokens or full.finish_reason == "stop"
    assert engine.stats().running == 0


def test_sharded_engine_gives_the_unsharded_answers(tiny_checkpoint, tiny_model, tiny_processor, conversations):
    """On a 1×2×4 mesh of 8 CPU devices (cache split over KV heads where they divide, the rest replicated)."""
    from minicpmv_jax import MiniCPMV
    mesh = sharding.make_mesh(1, 2, 4)
    model = MiniCPMV.from_pretrained(tiny_checkpoint[0], dtype="float32", mesh=mesh)
    lengths = [8, 6, 10]
    engine = Engine(model, tiny_processor, EngineConfig(max_batch=2, max_len=256))
    got = _run(engine, _requests(tiny_processor, conversations[:3], lengths, **GREEDY))
    assert engine._slots.cache.k[0].sharding.mesh.shape == mesh.shape
    for conv, n, out in zip(conversations, lengths, got):
        assert out.text == tiny_model.chat(msgs=conv, processor=tiny_processor, max_new_tokens=n, **GREEDY)


def test_background_thread_serves_concurrent_clients_and_drains(tiny_model, tiny_processor, conversations):
    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=3, max_len=256)).start()
    try:
        lengths = [6, 3, 9, 5, 7, 4]
        requests = _requests(tiny_processor, conversations, lengths, **GREEDY)
        results = [None] * len(requests)

        def client(i):
            results[i] = "".join(piece.text for piece in engine.submit(requests[i]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for conv, n, text in zip(conversations, lengths, results):
            assert text == tiny_model.chat(msgs=conv, processor=tiny_processor, max_new_tokens=n, **GREEDY)
        in_flight = engine.submit(requests[2])
    finally:
        assert engine.stop(timeout=120)
    assert in_flight.finished and in_flight.finish_reason in ("stop", "length")
    with pytest.raises(EngineStopped):
        engine.submit(requests[0])


def test_a_request_that_fails_fails_alone(tiny_model, tiny_processor, conversations):
    """A prompt whose image spans have no pixels fails at admission: its handle raises, the observer hears
    of it, and the request beside it is answered."""
    from minicpmv_jax.engine import EngineError

    ended = []

    class Observer:
        def first_token(self, seconds):
            assert seconds >= 0

        def token(self, seconds):
            assert seconds >= 0

        def finished(self, handle):
            ended.append((handle.request_id, handle.finish_reason))

    engine = Engine(tiny_model, tiny_processor, EngineConfig(max_batch=2, max_len=512), observer=Observer())
    good, with_image = _requests(tiny_processor, [conversations[1], conversations[0]], [4, 4], **GREEDY)
    broken = Request(prompt=dict(with_image.prompt, pixel_values=[[]]), config=with_image.config)
    handles = [engine.submit(broken), engine.submit(good)]
    engine.run_until_idle()
    with pytest.raises(EngineError, match=broken.request_id):
        handles[0].result()
    assert handles[1].result().finish_reason in ("stop", "length")
    assert sorted(ended) == sorted([(broken.request_id, "error"), (handles[1].request_id,
                                                                   handles[1].finish_reason)])
