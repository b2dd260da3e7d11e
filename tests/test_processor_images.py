"""Image path of the processor (docs/model.md §6, §8): placeholders, pieces, tgt_sizes, image_bound, overrides,
several images, batches, truncation and errors.

Expected prompts are written out here from docs/model.md §6's wording; the slice geometry (which grid, which
sizes) comes from ``slicing.plan_slices``, itself checked against an independent oracle in test_slicing.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from minicpmv_jax.image_processing import ImageError
from minicpmv_jax.processor import IMAGE_TAG, MiniCPMVProcessor, PreprocessorConfig
from minicpmv_jax.slicing import plan_slices


@pytest.fixture(scope="module")
def processor(tok_dir: str) -> MiniCPMVProcessor:
    return MiniCPMVProcessor.from_pretrained(tok_dir)


def image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def expected_placeholder(k: int | None, grid: tuple[int, int] | None) -> str:
    """docs/model.md §6, spelled out: optional image id, the overview's 64 <unk>, then the grid lines."""
    unks = "<unk>" * 64
    text = "" if k is None else f"<image_id>{k}</image_id>"
    text += "<image>" + unks + "</image>"
    if grid is not None:
        cols, rows = grid
        text += "\n".join(["".join(["<slice>" + unks + "</slice>"] * cols)] * rows)
    return text


def expected_pieces(img: Image.Image, max_slice_nums: int) -> list[np.ndarray]:
    """Overview then slices, bicubic, (x/255 − 0.5)/0.5, as [3, h, w]."""
    plan = plan_slices(*img.size, max_slice_nums)
    norm = lambda p: ((np.asarray(p, np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)  # noqa: E731
    pieces = [norm(img.resize(plan.overview_size, Image.Resampling.BICUBIC))]
    if plan.grid is not None:
        refine = img.resize(plan.refine_size, Image.Resampling.BICUBIC)
        sw, sh = plan.slice_size
        for r in range(plan.grid[1]):
            for c in range(plan.grid[0]):
                pieces.append(norm(refine.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh))))
    return pieces


def check_bounds(batch: dict, row: int, tok) -> None:
    ids = batch["input_ids"][row]
    for start, end in batch["image_bound"][row].tolist():
        assert end - start == 64 and (ids[start:end] == tok.unk_id).all()
        assert ids[start - 1] in (tok.image_start_id, tok.slice_start_id)
        assert ids[end] in (tok.image_end_id, tok.slice_end_id)


def test_one_unsliced_image(processor: MiniCPMVProcessor) -> None:
    tok = processor.tokenizer
    img = image(0, 300, 200)
    text = "Look: " + IMAGE_TAG + "\nWhat is it?"
    batch = processor([text], [[img]])
    expected = "Look: " + expected_placeholder(0, None) + "\nWhat is it?"
    assert batch["input_ids"][0].tolist() == tok.encode(expected)
    assert len(batch["pixel_values"][0]) == 1
    piece = batch["pixel_values"][0][0]
    assert piece.dtype == np.float32 and piece.shape[0] == 3
    np.testing.assert_array_equal(piece, expected_pieces(img, 9)[0])
    assert batch["tgt_sizes"][0].tolist() == [[piece.shape[1] // 14, piece.shape[2] // 14]]
    assert batch["tgt_sizes"][0].dtype == np.int32
    assert batch["image_sizes"] == [[(300, 200)]]
    assert batch["image_bound"][0].shape == (1, 2)
    check_bounds(batch, 0, tok)


@pytest.mark.parametrize("size,max_slice_nums", [((1344, 896), 9), ((700, 460), 4), ((2000, 300), 9),
                                                  ((500, 480), 2), ((1344, 1344), 1)])
def test_sliced_image(processor: MiniCPMVProcessor, size, max_slice_nums) -> None:
    tok = processor.tokenizer
    img = image(1, *size)
    plan = plan_slices(*size, max_slice_nums)
    batch = processor([IMAGE_TAG + "Q"], [[img]], max_slice_nums=max_slice_nums)
    assert batch["input_ids"][0].tolist() == tok.encode(expected_placeholder(0, plan.grid) + "Q")
    want = expected_pieces(img, max_slice_nums)
    got = batch["pixel_values"][0]
    assert len(got) == len(want) == plan.num_pieces == len(batch["image_bound"][0])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert batch["tgt_sizes"][0].tolist() == [[p.shape[1] // 14, p.shape[2] // 14] for p in want]
    check_bounds(batch, 0, tok)


def test_several_images_ids_and_order(processor: MiniCPMVProcessor) -> None:
    tok = processor.tokenizer
    imgs = [image(2, 100, 80), image(3, 900, 600), image(4, 60, 60)]
    text = f"A {IMAGE_TAG} B {IMAGE_TAG}C{IMAGE_TAG}"
    batch = processor([text], [imgs], max_slice_nums=4)
    grid1 = plan_slices(900, 600, 4).grid
    assert grid1 is not None
    expected = (f"A {expected_placeholder(0, None)} B {expected_placeholder(1, grid1)}C"
                f"{expected_placeholder(2, None)}")
    assert batch["input_ids"][0].tolist() == tok.encode(expected)
    want = [p for img in imgs for p in expected_pieces(img, 4)]
    assert len(batch["pixel_values"][0]) == len(want) == len(batch["image_bound"][0])
    for g, w in zip(batch["pixel_values"][0], want):
        np.testing.assert_array_equal(g, w)
    assert batch["image_sizes"] == [[(100, 80), (900, 600), (60, 60)]]


def test_use_image_id_and_max_slice_nums_overrides(processor: MiniCPMVProcessor) -> None:
    tok = processor.tokenizer
    img = image(5, 1000, 700)
    plain = processor([IMAGE_TAG], [[img]], use_image_id=False, max_slice_nums=1)
    assert plain["input_ids"][0].tolist() == tok.encode(expected_placeholder(None, None))
    assert len(plain["pixel_values"][0]) == 1
    # The processor's configured defaults apply when the overrides are None.
    default = processor([IMAGE_TAG], [[img]])
    assert default["input_ids"][0].tolist() == tok.encode(expected_placeholder(0, plan_slices(1000, 700, 9).grid))
    with pytest.raises(ValueError, match="max_slice_nums"):
        processor([IMAGE_TAG], [[img]], max_slice_nums=0)
    with pytest.raises(ValueError, match="use_image_id"):
        processor([IMAGE_TAG], [[img]], use_image_id="yes")


def test_config_values_are_used(tok_dir: str, tmp_path) -> None:
    """use_image_id, max_slice_nums, slice_mode and the normalisation come from preprocessor_config.json."""
    folder = tmp_path / "p"
    shutil.copytree(tok_dir, folder)
    cfg = {"use_image_id": False, "max_slice_nums": 2, "norm_mean": [0.25, 0.5, 0.75], "norm_std": [0.5, 0.25, 1.0]}
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg))
    proc = MiniCPMVProcessor.from_pretrained(str(folder))
    img = image(6, 900, 900)
    batch = proc([IMAGE_TAG], [[img]])
    plan = plan_slices(900, 900, 2)
    assert batch["input_ids"][0].tolist() == proc.tokenizer.encode(expected_placeholder(None, plan.grid))
    over = np.asarray(img.resize(plan.overview_size, Image.Resampling.BICUBIC), np.float32) / 255
    want = ((over - np.array([0.25, 0.5, 0.75], np.float32)) / np.array([0.5, 0.25, 1.0], np.float32))
    np.testing.assert_allclose(batch["pixel_values"][0][0], want.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    (folder / "preprocessor_config.json").write_text(json.dumps({"slice_mode": False}))
    batch = MiniCPMVProcessor.from_pretrained(str(folder))([IMAGE_TAG], [[img]])
    assert len(batch["pixel_values"][0]) == 1  # no slicing: the overview only


def test_batch_left_padding_shifts_bounds(processor: MiniCPMVProcessor) -> None:
    tok = processor.tokenizer
    texts = ["text only, but long enough " * 3, IMAGE_TAG + "?", "two " + IMAGE_TAG + IMAGE_TAG]
    images = [None, [image(7, 50, 50)], [image(8, 40, 90), image(9, 500, 500)]]
    batch = processor(texts, images, max_slice_nums=2)
    assert [len(b) for b in batch["image_bound"]] == [0, 1, 1 + plan_slices(500, 500, 2).num_pieces]
    assert [len(p) for p in batch["pixel_values"]] == [0, 1, 1 + plan_slices(500, 500, 2).num_pieces]
    for row in (1, 2):
        check_bounds(batch, row, tok)
        alone = processor([texts[row]], [images[row]], max_slice_nums=2)
        shift = batch["input_ids"].shape[1] - alone["input_ids"].shape[1]
        assert (batch["image_bound"][row] - shift).tolist() == alone["image_bound"][0].tolist()
    assert batch["image_sizes"] == [[], [(50, 50)], [(40, 90), (500, 500)]]


def test_image_sources_path_bytes_and_modes(processor: MiniCPMVProcessor, tmp_path) -> None:
    img = image(10, 64, 48)
    path = tmp_path / "x.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    gray = img.convert("L")
    batch = processor([IMAGE_TAG * 4], [[img, str(path), buf.getvalue(), gray]])
    pv = batch["pixel_values"][0]
    np.testing.assert_array_equal(pv[0], pv[1])
    np.testing.assert_array_equal(pv[0], pv[2])
    np.testing.assert_array_equal(pv[3][0], pv[3][1])  # grey → three equal channels


def test_tag_and_image_count_mismatch(processor: MiniCPMVProcessor) -> None:
    img = image(11, 30, 30)
    with pytest.raises(ValueError, match=r"texts\[1\]: the prompt has 2 image tag\(s\).* but 1 image\(s\)"):
        processor(["fine", IMAGE_TAG + IMAGE_TAG], [[], [img]])
    with pytest.raises(ValueError, match=r"texts\[0\]: the prompt has 0 image tag\(s\).* but 1 image\(s\)"):
        processor(["no tag here"], [[img]])
    with pytest.raises(ValueError, match=r"has 1 image tag\(s\).* but 0 image\(s\)"):
        processor([IMAGE_TAG])


def test_bad_image_is_named(processor: MiniCPMVProcessor, tmp_path) -> None:
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"this is text, not a JPEG")
    with pytest.raises(ImageError, match=r"texts\[0\]: image 1: .*not_an_image\.jpg"):
        processor([IMAGE_TAG + IMAGE_TAG], [[image(12, 20, 20), str(bad)]])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        processor([IMAGE_TAG], [[os.path.join(str(tmp_path), "missing.png")]])


def test_max_length_cutting_a_placeholder(processor: MiniCPMVProcessor) -> None:
    text = IMAGE_TAG + " and " + IMAGE_TAG
    imgs = [image(13, 30, 30), image(14, 30, 30)]
    full = processor([text], [imgs])
    cut = int(full["image_bound"][0][1, 0]) + 5
    batch = processor([text], [imgs], max_length=cut)
    assert batch["input_ids"].shape == (1, cut)
    assert batch["image_bound"][0].tolist() == full["image_bound"][0][:1].tolist()
    assert len(batch["pixel_values"][0]) == 2  # pieces are kept; the model uses as many as there are spans


def test_preprocessor_config_rejects_other_placeholder_tokens(tmp_path) -> None:
    with pytest.raises(ValueError, match="unk"):
        PreprocessorConfig.from_dict({"unk": "<unknown>"})
    assert PreprocessorConfig.from_dict({"unk": "<unk>", "im_start": "<image>"}) == PreprocessorConfig()
