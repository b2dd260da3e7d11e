"""``MiniCPMV.chat``: prompts from messages, answers, batches, streaming, seeds, feature reuse, errors."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import noise_image
from minicpmv_jax import chat as chat_lib
from minicpmv_jax import generate as gen
from minicpmv_jax.conversation import conversation_prompt
from minicpmv_jax.feature_cache import feature_cache_stats
from minicpmv_jax.generation_config import GenerationConfig
from minicpmv_jax.processor import IMAGE_TAG

N = 12  # max_new_tokens in these tests


@pytest.fixture(scope="module")
def img():
    return noise_image(0, 300, 200)


def user(*content):
    return {"role": "user", "content": list(content) if len(content) > 1 else content[0]}


# ---------------------------------------------------------------------------------------- prompts


def test_prompt_from_messages(tiny_processor, img):
    tok = tiny_processor.tokenizer
    other = noise_image(1, 50, 50)
    msgs = [user(img, "What is it?"), {"role": "assistant", "content": "A cat."},
            user("And this?", other, "Compare.")]
    text, images = conversation_prompt(msgs, None, tok, system_prompt="Be brief.")
    assert images == [img, other]
    assert text == tok.apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": IMAGE_TAG + "\nWhat is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And this?\n" + IMAGE_TAG + "\nCompare."}], add_generation_prompt=True)
    # image= goes before the first message's text when that content is a string (the reference's rule).
    text2, images2 = conversation_prompt([user("What is it?")], img, tok)
    assert images2 == [img] and IMAGE_TAG + "\nWhat is it?" in text2
    assert "Be brief" not in text2


@pytest.mark.parametrize("msgs,error", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "first message must be from the user"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"content": "hi"}], r"msgs\[0\] must be a dict with 'role' and 'content'"),
    ([{"role": "user", "content": ["ok", 3]}], r"msgs\[0\]\['content'\]\[1\] must be a str or a PIL image"),
])
def test_bad_messages(tiny_model, tiny_processor, msgs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        tiny_model.chat(msgs=msgs, processor=tiny_processor, max_new_tokens=2)


# ---------------------------------------------------------------------------------------- answers


def test_greedy_answer_is_the_decoded_generation(tiny_model, tiny_processor, img):
    """chat's text = generated ids minus the final stop token, decoded with special tokens, stripped."""
    msgs = [user(img, "What is this?")]
    answer = tiny_model.chat(msgs=msgs, processor=tiny_processor, sampling=False, num_beams=1, repetition_penalty=1.0,
                        max_new_tokens=N)
    text, images = conversation_prompt(msgs, None, tiny_processor.tokenizer)
    prepared = gen.prepare_batch(tiny_model, tiny_processor([text], [images]))
    out = gen.generate(tiny_model, prepared, GenerationConfig(max_new_tokens=N), tiny_processor.tokenizer.stop_ids)
    ids = np.asarray(out.tokens)[0, :int(out.lengths[0])].tolist()
    assert answer == tiny_processor.tokenizer.decode(chat_lib.answer_ids(ids, len(ids), tiny_processor.tokenizer.stop_ids)).strip()
    assert answer


def test_answer_ids_drop_only_the_final_stop():
    assert chat_lib.answer_ids(np.array([5, 0, 7, 9, 9]), 4, (9,)) == [5, 0, 7]   # id 0 kept
    assert chat_lib.answer_ids(np.array([5, 9, 7]), 3, (9,)) == [5, 9, 7]


def test_sampling_defaults_and_seed(tiny_model, tiny_processor, img):
    msgs = [user(img, "Describe.")]
    a = tiny_model.chat(msgs=msgs, processor=tiny_processor, max_new_tokens=N, seed=7)
    assert tiny_model.chat(msgs=msgs, processor=tiny_processor, max_new_tokens=N, seed=7) == a
    others = {tiny_model.chat(msgs=msgs, processor=tiny_processor, max_new_tokens=N, seed=s, temperature=1.5)
              for s in (1, 2, 3)}
    assert len(others) > 1


def test_batch_equals_each_conversation_alone(tiny_model, tiny_processor, img):
    convs = [[user(img, "What is this?")],
             [user("A text-only question that is longer than the other one, to pad.")],
             [user(noise_image(3, 600, 500), "Slices?"), {"role": "assistant", "content": "Yes."}, user("Sure?")]]
    for kw in (dict(sampling=False), dict(sampling=False, num_beams=1, repetition_penalty=1.3)):
        together = tiny_model.chat(msgs=convs, processor=tiny_processor, max_new_tokens=6, max_slice_nums=2, **kw)
        assert isinstance(together, list) and len(together) == 3
        alone = [tiny_model.chat(msgs=c, processor=tiny_processor, max_new_tokens=6, max_slice_nums=2, **kw) for c in convs]
        assert together == alone


def test_batched_image_argument(tiny_model, tiny_processor, img):
    convs = [[user("What is this?")], [user("Hello")]]
    answers = tiny_model.chat(image=[img, None], msgs=convs, processor=tiny_processor, sampling=False, max_new_tokens=4)
    assert answers[0] == tiny_model.chat(image=img, msgs=convs[0], processor=tiny_processor, sampling=False,
                                    max_new_tokens=4)
    with pytest.raises(ValueError, match="one entry per conversation"):
        tiny_model.chat(image=[img], msgs=convs, processor=tiny_processor, max_new_tokens=2)


@pytest.mark.parametrize("kw", [dict(sampling=False, num_beams=1), dict(sampling=True, seed=11)],
                         ids=["greedy", "sampling"])
def test_stream_equals_non_stream(tiny_model, tiny_processor, img, kw):
    msgs = [user(img, "Tell me more.")]
    whole = tiny_model.chat(msgs=msgs, processor=tiny_processor, max_new_tokens=N, **kw)
    pieces = list(tiny_model.chat(msgs=msgs, processor=tiny_processor, max_new_tokens=N, stream=True, **kw))
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_stream_refuses_beams_and_batches(tiny_model, tiny_processor):
    with pytest.raises(ValueError, match="stream=True"):
        tiny_model.chat(msgs=[user("hi")], processor=tiny_processor, sampling=False, stream=True)
    with pytest.raises(ValueError, match="stream=True"):
        tiny_model.chat(msgs=[[user("hi")], [user("ho")]], processor=tiny_processor, stream=True)


def test_stop_and_max_new_tokens(tiny_model, tiny_processor):
    """With min_new_tokens = max_new_tokens, the answer is exactly max_new_tokens tokens long."""
    msgs = [user("Count.")]
    config = dict(sampling=False, num_beams=1, max_new_tokens=5, min_new_tokens=5)
    text, _ = conversation_prompt(msgs, None, tiny_processor.tokenizer)
    prepared = gen.prepare_batch(tiny_model, tiny_processor([text]))
    assert prepared.features is None
    out = gen.generate(tiny_model, prepared, GenerationConfig(max_new_tokens=5, min_new_tokens=5),
                       tiny_processor.tokenizer.stop_ids)
    assert int(out.lengths[0]) == 5
    answer = tiny_model.chat(msgs=msgs, processor=tiny_processor, **config)
    ids = np.asarray(out.tokens)[0, :5].tolist()
    assert answer == tiny_processor.tokenizer.decode(ids).strip()


def test_follow_up_reuses_vision_features(tiny_model, tiny_processor):
    image = noise_image(21, 640, 480)
    stats = feature_cache_stats(tiny_model)
    first = [user(image, "What is this?")]
    answer = tiny_model.chat(msgs=first, processor=tiny_processor, sampling=False, max_new_tokens=4, max_slice_nums=4)
    misses = stats.misses
    follow = first + [{"role": "assistant", "content": answer}, user("And the colours?")]
    tiny_model.chat(msgs=follow, processor=tiny_processor, sampling=False, max_new_tokens=4, max_slice_nums=4)
    assert stats.misses == misses and stats.hits > 0


def test_max_inp_length_truncates_the_prompt(tiny_model, tiny_processor):
    msgs = [user("word " * 200)]
    answer = tiny_model.chat(msgs=msgs, processor=tiny_processor, sampling=False, max_new_tokens=3, max_inp_length=20)
    assert isinstance(answer, str)


def test_generation_keywords_are_checked(tiny_model, tiny_processor):
    with pytest.raises(TypeError, match="unknown generation keyword.*'topk'"):
        tiny_model.chat(msgs=[user("hi")], processor=tiny_processor, topk=3)
    with pytest.raises(ValueError, match="temperature"):
        tiny_model.chat(msgs=[user("hi")], processor=tiny_processor, temperature=0)
    with pytest.raises(ValueError, match="chat needs processor="):
        tiny_model.chat(msgs=[user("hi")])


def test_generation_config_defaults():
    s = GenerationConfig.for_chat(True)
    assert (s.do_sample, s.top_p, s.top_k, s.temperature, s.repetition_penalty, s.num_beams) == \
        (True, 0.8, 100, 0.7, 1.05, 1)
    b = GenerationConfig.for_chat(False)
    assert (b.do_sample, b.num_beams, b.repetition_penalty, b.strategy) == (False, 3, 1.2, "beam")
    assert GenerationConfig.for_chat(False, num_beams=1).strategy == "greedy"
    assert GenerationConfig.for_chat(True, top_k=5, max_new_tokens=9).top_k == 5
    with pytest.warns(UserWarning, match="only act when sampling"):
        GenerationConfig.for_chat(False, temperature=0.3)
    with pytest.raises(ValueError, match="beam sampling"):
        GenerationConfig.for_chat(True, num_beams=2)


def test_new_pieces_are_encoded_in_groups_with_the_same_features(tiny_model, monkeypatch):
    """More new pieces than ``ENCODE_GROUP`` (a long video) are encoded a group at a time: each piece's
    features equal those of one batch of all of them."""
    from minicpmv_jax import feature_cache
    from minicpmv_jax.image_inputs import pack_for_encoder

    rng = np.random.default_rng(7)
    pieces = [rng.standard_normal((3, 14 * rng.integers(2, 5), 14 * rng.integers(2, 5))).astype(np.float32)
              for _ in range(11)]
    monkeypatch.setattr(feature_cache, "ENCODE_GROUP", 4)
    calls = []
    real = type(tiny_model).encode_pieces_packed
    monkeypatch.setattr(type(tiny_model), "encode_pieces_packed",
                        lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    got = feature_cache.encode_pieces(tiny_model, pieces)
    assert len(calls) == 3                                                      # 4 + 4 + 3 new pieces
    cfg = tiny_model.config
    whole = real(tiny_model, *pack_for_encoder(pieces, patch_size=cfg.vision.patch_size,
                                               side=cfg.vision.num_patches_per_side))
    for i, features in enumerate(got):
        np.testing.assert_allclose(np.asarray(features), np.asarray(whole[i]), rtol=1e-5, atol=1e-5)
