"""Whole-model logits: MiniCPMV.compute_logits vs the torch composite (transformers Qwen2 + torch vision
reference) on the same random tiny checkpoint, through the real processor — no image, one image, two
images, a sliced image, and mixed left-padded batches."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import noise_image
from minicpmv_jax import MiniCPMV
from minicpmv_jax.processor import IMAGE_TAG
from reference import rel_err

TOL = 1e-4


def chat(tiny_processor, content: str) -> str:
    return tiny_processor.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True)


def check(tiny_model, torch_reference, batch) -> float:
    ours = np.asarray(tiny_model.compute_logits(batch))
    theirs = torch_reference.logits(batch)
    assert ours.shape == theirs.shape
    mask = batch["attention_mask"]
    err = rel_err(ours[mask], theirs[mask])
    assert err <= TOL, err
    return err


CASES = {
    "no image": ([], "Describe the weather in one word."),
    "one image": ([(0, 300, 200)], IMAGE_TAG + "\nWhat is in this picture?"),
    "two images": ([(1, 120, 90), (2, 64, 300)], IMAGE_TAG + IMAGE_TAG + "\nCompare them."),
    "sliced image": ([(3, 700, 460)], "Read this: " + IMAGE_TAG),
}


@pytest.mark.parametrize("case", list(CASES))
def test_single_prompt_parity(tiny_model, tiny_processor, torch_reference, case):
    specs, question = CASES[case]
    images = [noise_image(*spec) for spec in specs]
    batch = tiny_processor([chat(tiny_processor, question)], [images], max_slice_nums=4)
    if case == "sliced image":
        assert len(batch["pixel_values"][0]) > 1, "the image should have been sliced"
    assert len(batch["image_bound"][0]) == len(batch["pixel_values"][0])
    check(tiny_model, torch_reference, batch)


def test_images_change_the_logits(tiny_model, tiny_processor):
    """Features are really written into the spans: a different image changes the answer's logits."""
    text = [chat(tiny_processor, IMAGE_TAG + "\nWhat is this?")]
    a = np.asarray(tiny_model.compute_logits(tiny_processor(text, [[noise_image(0, 200, 200)]])))
    b = np.asarray(tiny_model.compute_logits(tiny_processor(text, [[noise_image(9, 200, 200)]])))
    assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-2


def test_mixed_batch_parity_and_rows_match_single(tiny_model, tiny_processor, torch_reference):
    """Rows with and without images, different lengths (left padding), several slicing modes."""
    texts = [chat(tiny_processor, IMAGE_TAG + "\nA short one?"),
             chat(tiny_processor, "No image here, but a longer question so that rows differ in length."),
             chat(tiny_processor, "Two: " + IMAGE_TAG + " and " + IMAGE_TAG)]
    images = [[noise_image(4, 500, 480)], [], [noise_image(5, 90, 90), noise_image(6, 300, 100)]]
    batch = tiny_processor(texts, images, max_slice_nums=2)
    assert [len(p) for p in batch["pixel_values"]] == [3, 0, 2]  # the first image is sliced in two
    check(tiny_model, torch_reference, batch)
    together = np.asarray(tiny_model.compute_logits(batch))
    for i in range(len(texts)):
        alone = tiny_processor([texts[i]], [images[i]], max_slice_nums=2)
        logits = np.asarray(tiny_model.compute_logits(alone))[0]
        n = logits.shape[0]
        assert rel_err(together[i, -n:], logits) <= 1e-5


def test_truncated_placeholder_uses_only_the_spans_left(tiny_model, tiny_processor, torch_reference):
    """max_length cutting into the second image's placeholder: only the first image's pieces are used."""
    text = chat(tiny_processor, IMAGE_TAG + " then " + IMAGE_TAG)
    images = [noise_image(7, 100, 100), noise_image(8, 100, 100)]
    full = tiny_processor([text], [images])
    second_start = int(full["image_bound"][0][1, 0])
    batch = tiny_processor([text], [images], max_length=second_start + 10)
    assert len(batch["image_bound"][0]) == 1 and len(batch["pixel_values"][0]) == 2
    check(tiny_model, torch_reference, batch)


def test_bfloat16_model_is_close(tiny_checkpoint, tiny_processor, torch_reference):
    model16 = MiniCPMV.from_pretrained(tiny_checkpoint[0], dtype="bfloat16")
    batch = tiny_processor([chat(tiny_processor, IMAGE_TAG + "\nWhat is this?")], [[noise_image(0, 300, 200)]])
    ours = np.asarray(model16.compute_logits(batch))
    assert ours.dtype == np.float32 and model16.vpm.dtype == jnp.bfloat16
    mask = batch["attention_mask"]
    assert rel_err(ours[mask], torch_reference.logits(batch)[mask]) <= 5e-2


def test_batch_errors_are_clear(tiny_model, tiny_processor):
    batch = tiny_processor([chat(tiny_processor, IMAGE_TAG)], [[noise_image(0, 50, 50)]])
    bad = dict(batch, pixel_values=[[]])
    with pytest.raises(ValueError, match="1 image placeholder spans but only 0 image pieces"):
        tiny_model.compute_logits(bad)
    start, _ = batch["image_bound"][0][0]
    bad = dict(batch, image_bound=[np.array([[start, start + 10]])])
    with pytest.raises(ValueError, match="holds 10 positions, expected 64"):
        tiny_model.compute_logits(bad)
    bad = dict(batch)
    del bad["pixel_values"]
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model.compute_logits(bad)
