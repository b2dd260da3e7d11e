"""Text path of the processor: padding, masks, dtypes, truncation, the image_bound helper, config."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from minicpmv_jax.processor import (
    IMAGE_TAG,
    MiniCPMVProcessor,
    PreprocessorConfig,
    image_bounds,
    left_pad,
)
from minicpmv_jax.tokenizer import MiniCPMVTokenizer


@pytest.fixture(scope="module")
def processor(tok_dir: str) -> MiniCPMVProcessor:
    return MiniCPMVProcessor.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def tok(processor: MiniCPMVProcessor) -> MiniCPMVTokenizer:
    return processor.tokenizer


def _chat(tok: MiniCPMVTokenizer, question: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def test_left_padding_mask_and_dtypes(processor: MiniCPMVProcessor, tok: MiniCPMVTokenizer) -> None:
    texts = [_chat(tok, "Hi"), _chat(tok, "A much longer question about 机器学习 and emoji 🎉?")]
    batch = processor(texts)
    ids = [tok.encode(t) for t in texts]
    length = max(map(len, ids))
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (2, length)
    assert batch["attention_mask"].dtype == np.bool_ and batch["attention_mask"].shape == (2, length)
    for row, row_ids in enumerate(ids):
        pad = length - len(row_ids)
        assert batch["input_ids"][row, pad:].tolist() == row_ids
        assert (batch["input_ids"][row, :pad] == 0).all()
        assert not batch["attention_mask"][row, :pad].any() and batch["attention_mask"][row, pad:].all()
    assert batch["attention_mask"][1].all()  # the longest row is not padded
    assert len(batch["image_bound"]) == 2
    for bound in batch["image_bound"]:
        assert bound.shape == (0, 2) and np.issubdtype(bound.dtype, np.integer)
    assert batch["pixel_values"] == [[], []] and batch["image_sizes"] == [[], []]
    assert [t.shape for t in batch["tgt_sizes"]] == [(0, 2), (0, 2)]


def test_single_string_and_empty_image_lists(processor: MiniCPMVProcessor, tok: MiniCPMVTokenizer) -> None:
    text = _chat(tok, "Hello")
    batch = processor(text, images=[[]])
    assert batch["input_ids"].tolist() == [tok.encode(text)]
    assert batch["attention_mask"].all()


def test_max_length_keeps_the_start(processor: MiniCPMVProcessor, tok: MiniCPMVTokenizer) -> None:
    texts = [_chat(tok, "short"), _chat(tok, "a question that is quite a bit longer than the other one")]
    ids = [tok.encode(t) for t in texts]
    max_length = len(ids[0]) + 3
    batch = processor(texts, max_length=max_length)
    assert batch["input_ids"].shape == (2, max_length)
    assert batch["input_ids"][1].tolist() == ids[1][:max_length]
    assert batch["input_ids"][0, 3:].tolist() == ids[0]
    assert batch["attention_mask"].sum(axis=1).tolist() == [len(ids[0]), max_length]
    with pytest.raises(ValueError, match="max_length"):
        processor(texts, max_length=0)


def test_argument_errors(processor: MiniCPMVProcessor) -> None:
    with pytest.raises(ValueError, match="texts is empty"):
        processor([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        processor(["ok", 3])
    with pytest.raises(ValueError, match="one list per text"):
        processor(["a", "b"], images=[[]])
    with pytest.raises(ValueError, match=r"texts\[0\] encodes to no tokens"):
        processor([""])


class _FakeImageProcessor(MiniCPMVProcessor):
    """Fills the image seam with a hand-made placeholder: overview + a 2×1 slice grid, 3 <unk> each."""

    def expand_images(self, text, images, max_slice_nums, use_image_id):
        unks = "<unk>" * 3
        placeholder = f"<image_id>0</image_id><image>{unks}</image><slice>{unks}</slice><slice>{unks}</slice>"
        pieces = [np.zeros((3, 14, 14), np.float32)] * 3
        return text.replace(IMAGE_TAG, placeholder), pieces, np.ones((3, 2), np.int32), [(20, 10)]


def test_image_bound_is_shifted_by_left_padding(processor: MiniCPMVProcessor, tok: MiniCPMVTokenizer) -> None:
    fake = _FakeImageProcessor(tok, processor.config)
    texts = [_chat(tok, "a long question first, so that the image prompt gets left-padded ok?"),
             _chat(tok, IMAGE_TAG + "\nWhat?")]
    batch = fake(texts, images=[[], ["img"]])
    assert batch["image_bound"][0].shape == (0, 2)
    bound = batch["image_bound"][1]
    assert bound.shape == (3, 2)
    row = batch["input_ids"][1]
    for start, end in bound.tolist():
        assert end - start == 3
        assert (row[start:end] == tok.unk_id).all()
        assert row[start - 1] in (tok.image_start_id, tok.slice_start_id)
        assert row[end] in (tok.image_end_id, tok.slice_end_id)
    assert len(batch["pixel_values"][1]) == 3 and batch["image_sizes"][1] == [(20, 10)]


# ------------------------------------------------------------------ image_bounds on hand-built ids


def test_image_bounds_hand_built(tok: MiniCPMVTokenizer) -> None:
    I, Ie, S, Se, U = tok.image_start_id, tok.image_end_id, tok.slice_start_id, tok.slice_end_id, tok.unk_id
    ids = [7, I, U, U, Ie, 9, S, U, U, U, Se, S, U, Se, 5, I, Ie, 3]
    assert image_bounds(ids, tok).tolist() == [[2, 4], [7, 10], [12, 13], [16, 16]]
    assert image_bounds(np.asarray(ids, np.int32), tok).dtype == np.int32
    # No placeholders; truncation inside a placeholder drops the unfinished span.
    assert image_bounds([1, 2, 3], tok).shape == (0, 2)
    assert image_bounds([], tok).shape == (0, 2)
    assert image_bounds([I, U, Ie, S, U, U], tok).tolist() == [[1, 2]]


def test_image_bounds_malformed(tok: MiniCPMVTokenizer) -> None:
    I, Ie, S, U = tok.image_start_id, tok.image_end_id, tok.slice_start_id, tok.unk_id
    with pytest.raises(ValueError, match="without a start"):
        image_bounds([U, Ie, I, U, Ie], tok)
    with pytest.raises(ValueError, match="inside the one opened"):
        image_bounds([I, U, S, U, Ie], tok)
    with pytest.raises(ValueError, match="1-D"):
        image_bounds([[I, Ie]], tok)


def test_left_pad() -> None:
    ids, mask = left_pad([[1, 2, 3], [4], []])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False] * 3]


# ------------------------------------------------------------------ preprocessor config


RELEASED_PREPROCESSOR_CONFIG = {
    "image_processor_type": "MiniCPMVImageProcessor",
    "processor_class": "MiniCPMVProcessor",
    "max_slice_nums": 9,
    "scale_resolution": 448,
    "patch_size": 14,
    "use_image_id": True,
    "image_feature_size": 64,
    "im_start": "<image>",
    "im_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "unk": "<unk>",
    "im_id_start": "<image_id>",
    "im_id_end": "</image_id>",
    "slice_mode": True,
    "norm_mean": [0.5, 0.5, 0.5],
    "norm_std": [0.5, 0.5, 0.5],
    "version": 2.6,
}


def test_preprocessor_config_from_folder(tok_dir: str, tmp_path) -> None:
    folder = str(tmp_path / "with_preprocessor")
    shutil.copytree(tok_dir, folder)
    cfg = dict(RELEASED_PREPROCESSOR_CONFIG, max_slice_nums=2, use_image_id=False)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f)
    processor = MiniCPMVProcessor.from_pretrained(folder)
    assert processor.config == PreprocessorConfig(max_slice_nums=2, use_image_id=False)
    assert PreprocessorConfig.from_dict(RELEASED_PREPROCESSOR_CONFIG) == PreprocessorConfig()
    with pytest.raises(AttributeError):
        processor.config.max_slice_nums = 3  # frozen


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("max_slice_nums", 0, "max_slice_nums must be a positive int"),
        ("patch_size", "14", "patch_size must be a positive int"),
        ("use_image_id", 1, "use_image_id must be true or false"),
        ("norm_std", [0.5, 0.5], "norm_std must be a list of 3 numbers"),
        ("norm_std", [0.5, 0, 0.5], "norm_std must not contain 0"),
        ("unk", "<pad>", "unk is '<pad>'"),
    ],
)
def test_preprocessor_config_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"cfg.json: {message}"):
        PreprocessorConfig.from_dict({key: value}, source="cfg.json")


def test_preprocessor_config_corrupt_file(tmp_path) -> None:
    path = tmp_path / "preprocessor_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json is not valid JSON"):
        PreprocessorConfig.from_file(str(path))
