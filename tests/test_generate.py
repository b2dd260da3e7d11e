"""Compiled generation vs transformers' ``generate`` on the same random tiny weights (float32).

The reference generates from ``inputs_embeds`` (the torch composite writes image features into them),
so its logits processors see only generated tokens — exactly as MiniCPM-V's ``chat()`` does.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from helpers import noise_image
from minicpmv_jax import generate as gen
from minicpmv_jax.buckets import bucket
from minicpmv_jax.generation_config import GenerationConfig
from minicpmv_jax.processor import IMAGE_TAG
from reference import rel_err


def prompt(tiny_processor, content: str) -> str:
    return tiny_processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True)


def hf_generate(torch_reference, batch, *, max_new_tokens, stop_ids, num_beams=1, repetition_penalty=1.0,
                length_penalty=1.0, min_new_tokens=0) -> list[list[int]]:
    """transformers' generate from inputs_embeds; each row's ids up to and including its stop token."""
    emb = torch_reference.embeddings(batch)
    mask = torch.from_numpy(np.asarray(batch["attention_mask"]).astype(np.int64))
    with torch.no_grad():
        out = torch_reference.llm.generate(
            inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=num_beams, repetition_penalty=repetition_penalty, length_penalty=length_penalty,
            early_stopping=False, min_new_tokens=min_new_tokens, eos_token_id=list(stop_ids),
            pad_token_id=int(stop_ids[0]), top_k=None, top_p=None, temperature=None)
    rows = []
    for row in out.numpy().tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t in stop_ids:
                break
        rows.append(ids)
    return rows


def ours(tiny_model, batch, *, max_new_tokens, stop_ids, strategy="greedy", num_beams=1, **settings
         ) -> list[list[int]]:
    prepared = gen.prepare_batch(tiny_model, batch)
    config = GenerationConfig(do_sample=strategy == "sample", max_new_tokens=max_new_tokens,
                              num_beams=num_beams if strategy == "beam" else 1, **settings)
    assert config.strategy == strategy
    out = gen.generate(tiny_model, prepared, config, stop_ids)
    assert out.tokens.shape[1] == bucket(max_new_tokens, 16) == gen.output_length(config)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokens[b, :lengths[b]].tolist() for b in range(prepared.batch_size)]


def text_batch(tiny_processor):
    return tiny_processor([prompt(tiny_processor, "Tell me a story about a fox."), prompt(tiny_processor, "Hi")])


def image_batch(tiny_processor):
    texts = [prompt(tiny_processor, IMAGE_TAG + "\nWhat is this?"), prompt(tiny_processor, "No image, a longer question.")]
    return tiny_processor(texts, [[noise_image(0, 300, 200)], []])


def rows_of(batch) -> list[dict]:
    """Each row of a processor batch as a batch of one, its left padding removed."""
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        pad = int((~batch["attention_mask"][b]).sum())
        rows.append({"input_ids": batch["input_ids"][b:b + 1, pad:],
                     "attention_mask": batch["attention_mask"][b:b + 1, pad:],
                     "image_bound": [batch["image_bound"][b] - pad], "pixel_values": [batch["pixel_values"][b]]})
    return rows


def hf_rows(torch_reference, batch, **kw) -> list[list[int]]:
    """transformers' answers row by row (batch of one each).

    With a repetition penalty, transformers ≥ 5 exempts the first ``pad_len`` *generated* tokens of a
    left-padded row when generating from ``inputs_embeds`` (its ``prompt_ignore_length`` is meant for
    prompt ids, which are absent here), so a padded row's answer depends on its batch. MiniCPM-V's
    reference (transformers 4.40) penalises every generated token; so do we, and a row's answer does not
    depend on its batch. The reference is therefore run one row at a time.
    """
    return [hf_generate(torch_reference, row, **kw)[0] for row in rows_of(batch)]


def stop_from(rows: list[list[int]], at: int) -> tuple[int, ...]:
    """A stop id the model really emits: row 0's token at ``at`` (so the stop path is exercised)."""
    return (rows[0][at],)


@pytest.mark.parametrize("make_batch", [text_batch, image_batch], ids=["text", "image"])
def test_greedy_equals_transformers(tiny_model, tiny_processor, torch_reference, make_batch):
    batch = make_batch(tiny_processor)
    stop = tuple(tiny_processor.tokenizer.stop_ids)
    want = hf_generate(torch_reference, batch, max_new_tokens=10, stop_ids=stop)
    assert ours(tiny_model, batch, max_new_tokens=10, stop_ids=stop) == want
    # A stop token the model emits mid-way: both stop there (the row ends with it), other rows go on.
    stop = stop_from(want, 4)
    want = hf_generate(torch_reference, batch, max_new_tokens=10, stop_ids=stop)
    assert want[0][-1] == stop[0] and len(want[0]) <= 5
    assert ours(tiny_model, batch, max_new_tokens=10, stop_ids=stop) == want


def test_greedy_repetition_penalty_and_min_new_tokens(tiny_model, tiny_processor, torch_reference):
    batch = text_batch(tiny_processor)
    free = hf_generate(torch_reference, batch, max_new_tokens=12, stop_ids=(151645,))
    stop = stop_from(free, 2)
    for kw in (dict(repetition_penalty=1.3), dict(min_new_tokens=6), dict(repetition_penalty=0.5)):
        want = hf_rows(torch_reference, batch, max_new_tokens=12, stop_ids=stop, **kw)
        assert ours(tiny_model, batch, max_new_tokens=12, stop_ids=stop, **kw) == want, kw
    want = hf_generate(torch_reference, batch, max_new_tokens=12, stop_ids=stop, min_new_tokens=6)
    assert len(want[0]) >= 6  # the early stop was really suppressed
    # The penalty really acts (below 1 it rewards repeats, which this model then makes).
    plain = ours(tiny_model, batch, max_new_tokens=12, stop_ids=(151645,))
    penalised = ours(tiny_model, batch, max_new_tokens=12, stop_ids=(151645,), repetition_penalty=0.5)
    assert plain != penalised


@pytest.mark.parametrize("make_batch", [text_batch, image_batch], ids=["text", "image"])
def test_beam_search_equals_transformers(tiny_model, tiny_processor, torch_reference, make_batch):
    batch = make_batch(tiny_processor)
    free = hf_generate(torch_reference, batch, max_new_tokens=8, stop_ids=(151645,), num_beams=3)
    stop = stop_from(free, 3)
    for kw in (dict(repetition_penalty=1.2), dict(length_penalty=0.5), dict()):
        want = hf_rows(torch_reference, batch, max_new_tokens=8, stop_ids=stop, num_beams=3, **kw)
        got = ours(tiny_model, batch, max_new_tokens=8, stop_ids=stop, strategy="beam", num_beams=3, **kw)
        assert got == want, kw
        if not kw:  # without a penalty the padded batch itself matches too
            assert got == hf_generate(torch_reference, batch, max_new_tokens=8, stop_ids=stop, num_beams=3)


def test_top_k_1_sampling_is_greedy(tiny_model, tiny_processor):
    batch = image_batch(tiny_processor)
    stop = tuple(tiny_processor.tokenizer.stop_ids)
    greedy = ours(tiny_model, batch, max_new_tokens=8, stop_ids=stop)
    sampled = ours(tiny_model, batch, max_new_tokens=8, stop_ids=stop, strategy="sample", top_k=1, temperature=0.7,
                   seed=3)
    assert sampled == greedy


def test_sampling_is_seeded(tiny_model, tiny_processor):
    batch = text_batch(tiny_processor)
    stop = tuple(tiny_processor.tokenizer.stop_ids)
    kw = dict(max_new_tokens=8, stop_ids=stop, strategy="sample", temperature=1.5)
    a = ours(tiny_model, batch, seed=1, **kw)
    assert ours(tiny_model, batch, seed=1, **kw) == a
    assert ours(tiny_model, batch, seed=2, **kw) != a


def test_parameters_do_not_recompile(tiny_model, tiny_processor):
    batch = text_batch(tiny_processor)
    stop = tuple(tiny_processor.tokenizer.stop_ids)
    ours(tiny_model, batch, max_new_tokens=5, stop_ids=stop, strategy="sample", temperature=0.5, top_k=10)
    before = gen._generate._cache_size()
    for t, k, p, n in ((0.9, 50, 0.8, 7), (1.3, 0, 1.0, 3), (0.2, 3, 0.5, 9)):
        ours(tiny_model, batch, max_new_tokens=n, stop_ids=stop, strategy="sample", temperature=t, top_k=k, top_p=p,
             repetition_penalty=1.1, seed=5)
    assert gen._generate._cache_size() == before


def test_max_new_tokens_is_honoured(tiny_model, tiny_processor):
    batch = text_batch(tiny_processor)
    rows = ours(tiny_model, batch, max_new_tokens=3, stop_ids=(151645,))
    assert all(len(r) <= 3 for r in rows) and max(len(r) for r in rows) == 3


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams"])
@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_chunked_prefill_equals_one_pass(tiny_model, tiny_processor, num_beams, attention):
    """A prompt prefilled in chunks of 16 tokens (each attending to the cache the earlier chunks wrote),
    with the dense or the blockwise kernel: the same next-token logits and cache (≤ 1e-5) and the same
    tokens as one pass of the dense kernel."""
    prepared = gen.prepare_batch(tiny_model, image_batch(tiny_processor))
    t = prepared.ids.shape[1]
    assert t >= 64 and t % 16 == 0 and prepared.features is not None
    config = GenerationConfig(max_new_tokens=8, num_beams=num_beams)
    stop = tuple(tiny_processor.tokenizer.stop_ids)
    first = GenerationConfig(max_new_tokens=8)
    try:
        tiny_model.llm.attention = "xla"
        whole = gen.generate(tiny_model, prepared, config, stop, prefill_chunk=None)
        a = gen.prefill(tiny_model, prepared, first, prefill_chunk=None)
        tiny_model.llm.attention = attention
        chunked = gen.generate(tiny_model, prepared, config, stop, prefill_chunk=16)
        b = gen.prefill(tiny_model, prepared, first, prefill_chunk=16)
    finally:
        tiny_model.llm.attention = "auto"
    np.testing.assert_array_equal(np.asarray(chunked.tokens), np.asarray(whole.tokens))
    np.testing.assert_array_equal(np.asarray(chunked.lengths), np.asarray(whole.lengths))
    assert rel_err(np.asarray(b.logits), np.asarray(a.logits)) <= 1e-5
    valid = np.asarray(a.key_valid)
    for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache)):
        assert rel_err(np.asarray(y)[valid], np.asarray(x)[valid]) <= 1e-5
