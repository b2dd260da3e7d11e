"""Pixel side of preprocessing: loading/validation, RGB conversion, slicing, normalisation (docs/model.md §3, §6)."""

from __future__ import annotations

import io
import pathlib
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from minicpmv_jax import image_processing as ip
from minicpmv_jax import slicing


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width × height`` but whose pixel data is a few bytes (valid CRCs)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(
        b"IEND", b"")


# ----------------------------------------------------------------------------------------------------
# Slicing pixels
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1344, 1344), (640, 480), (13, 13), (3, 147), (1000, 200), (449, 449)])
@pytest.mark.parametrize("n", [1, 2, 9])
def test_slice_image_sizes_follow_plan(size, n):
    img = _noise(*size)
    pieces, plan = ip.slice_image(img, n)
    assert plan == slicing.plan_slices(size[0], size[1], n, 448, 14)
    assert [p.size for p in pieces] == plan.piece_sizes
    assert all(p.mode == "RGB" for p in pieces)


def test_slice_order_is_overview_then_rows_left_to_right():
    # 1344x1344 with N = 9: grid 3x3, refine size = original size, so each slice is exactly one cell.
    colours = {}
    img = Image.new("RGB", (1344, 1344))
    for r in range(3):
        for c in range(3):
            colours[(r, c)] = (40 * r + 10, 40 * c + 10, 200)
            img.paste(colours[(r, c)], (448 * c, 448 * r, 448 * (c + 1), 448 * (r + 1)))
    pieces, plan = ip.slice_image(img, 9)
    assert plan.grid == (3, 3) and len(pieces) == 10
    assert pieces[0].size == (448, 448)
    for i, piece in enumerate(pieces[1:]):
        r, c = divmod(i, 3)
        assert np.all(np.asarray(piece) == np.array(colours[(r, c)], dtype=np.uint8)), (r, c)


def test_slices_are_bicubic_crops_of_the_refined_image():
    img = _noise(900, 500, seed=3)
    pieces, plan = ip.slice_image(img, 9)
    assert plan.grid is not None
    expected_overview = img.resize(plan.overview_size, resample=Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(pieces[0]), np.asarray(expected_overview))
    assert not np.array_equal(
        np.asarray(pieces[0]), np.asarray(img.resize(plan.overview_size, resample=Image.Resampling.BILINEAR)))
    refine = np.asarray(img.resize(plan.refine_size, resample=Image.Resampling.BICUBIC))
    sw, sh = plan.slice_size
    cols, rows = plan.grid
    for i, piece in enumerate(pieces[1:]):
        r, c = divmod(i, cols)
        assert np.array_equal(np.asarray(piece), refine[r * sh:(r + 1) * sh, c * sw:(c + 1) * sw])


def test_slice_image_requires_rgb():
    with pytest.raises(ValueError, match="RGB"):
        ip.slice_image(Image.new("L", (20, 20)), 9)


# ----------------------------------------------------------------------------------------------------
# Pixel values
# ----------------------------------------------------------------------------------------------------


def test_pixel_values_exact_normalisation():
    piece = Image.new("RGB", (28, 14), (0, 128, 255))
    x = ip.to_pixel_values(piece)
    assert x.dtype == np.float32 and x.shape == (3, 14, 28) and x.flags["C_CONTIGUOUS"]
    assert np.all(x[0] == -1.0) and np.all(x[2] == 1.0)
    g = (np.float32(128) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)  # float32 like the reference
    assert np.all(x[1] == g) and abs(float(g) - (128 / 255 - 0.5) / 0.5) < 1e-7


def test_pixel_values_match_hf_normalize():
    # The reference: to_numpy_array(img).astype(float32) / 255, then HF normalize with mean = std = 0.5.
    hf = pytest.importorskip("transformers.image_transforms")
    arr = np.asarray(_noise(28, 14, seed=5))
    ref = hf.normalize(arr.astype(np.float32) / 255, mean=np.array([0.5] * 3), std=np.array([0.5] * 3),
                       input_data_format="channels_last").transpose(2, 0, 1)
    assert np.array_equal(ip.to_pixel_values(Image.fromarray(arr, mode="RGB")), ref)


def test_pixel_values_channel_first_layout():
    arr = np.zeros((14, 28, 3), dtype=np.uint8)
    arr[3, 20] = (255, 0, 0)  # row 3, column 20, red
    x = ip.to_pixel_values(Image.fromarray(arr, mode="RGB"))
    assert x[0, 3, 20] == 1.0 and x[1, 3, 20] == -1.0 and x[0, 0, 0] == -1.0


def test_pixel_values_range_on_noise():
    pieces, _ = ip.slice_image(_noise(700, 500), 4)
    for piece in pieces:
        x = ip.to_pixel_values(piece)
        assert x.dtype == np.float32 and x.shape == (3, piece.size[1], piece.size[0])
        assert x.min() >= -1.0 and x.max() <= 1.0


def test_tgt_size():
    assert ip.tgt_size(Image.new("RGB", (42, 28))) == (2, 3)
    with pytest.raises(ValueError, match="patch_size"):
        ip.tgt_size(Image.new("RGB", (43, 28)))


def test_preprocess_image():
    out = ip.preprocess_image(_noise(1344, 1344), 9)
    assert out.grid == (3, 3) and out.image_size == (1344, 1344)
    assert len(out.pixel_values) == 10
    assert out.tgt_sizes.shape == (10, 2) and np.issubdtype(out.tgt_sizes.dtype, np.integer)
    assert np.array_equal(out.tgt_sizes, np.full((10, 2), 32))
    small = ip.preprocess_image(_noise(30, 20), 9)
    assert small.grid is None and small.tgt_sizes.shape == (1, 2)
    for pv, (th, tw) in zip(small.pixel_values, small.tgt_sizes):
        assert pv.shape == (3, 14 * th, 14 * tw)


# ----------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# ----------------------------------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rgba = Image.fromarray(np.dstack([np.asarray(_noise(16, 12)), np.full((12, 16), 7, np.uint8)]), mode="RGBA")
    p = _noise(16, 12).convert("P")
    p_trns = p.copy()
    p_trns.info["transparency"] = 5
    p_trns_bytes = p.copy()
    p_trns_bytes.info["transparency"] = bytes(range(256))
    return {
        "1": Image.new("1", (16, 12), 1),
        "L": Image.new("L", (16, 12), 77),
        "LA": Image.new("LA", (16, 12), (77, 0)),
        "La": Image.new("La", (16, 12), (77, 255)),
        "P": p,
        "P+trns": p_trns,
        "P+trns-bytes": p_trns_bytes,
        "PA": Image.new("PA", (16, 12)),
        "RGBA": rgba,
        "CMYK": Image.new("CMYK", (16, 12), (0, 255, 0, 0)),
        "YCbCr": Image.new("YCbCr", (16, 12), (128, 128, 128)),
        "I;16": Image.fromarray(np.full((12, 16), 40000, np.uint16)),
        "I": Image.fromarray(np.full((12, 16), 300, np.int32)),
        "F": Image.fromarray(np.full((12, 16), 0.5, np.float32)),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_every_mode_becomes_rgb_pieces(mode):
    img = _mode_images()[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning must not escape
        out = ip.preprocess_image(img, 9)
        rgb = ip.load_image(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    # 16x12 (4:3) is upscaled, not sliced: r = 4/3 -> (518, 392) (see test_slicing.test_hand_640x480).
    assert out.grid is None and len(out.pixel_values) == 1 and out.pixel_values[0].shape == (3, 392, 518)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+trns", "P+trns-bytes", "CMYK", "1", "YCbCr"])
def test_8bit_modes_match_pil_convert_rgb(mode):
    # Parity with the reference, which calls image.convert('RGB'): alpha is dropped, not composited.
    img = _mode_images()[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(ip.load_image(img)), expected)


def test_rgba_alpha_is_dropped_not_composited():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(ip.load_image(img))[0, 0].tolist() == [10, 20, 30]


def test_16bit_is_scaled_not_clipped():
    values = np.array([[0, 128, 129, 257, 32896, 65534, 65535]], dtype=np.uint16)
    rgb = np.asarray(ip.load_image(Image.fromarray(values)))
    assert rgb[..., 0].tolist() == [[0, 0, 1, 1, 128, 255, 255]]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    # Same from a 16-bit PNG file (PIL opens it as I;16) and a big-endian buffer.
    png = _encode(Image.fromarray(values), "PNG")
    assert np.array_equal(np.asarray(ip.load_image(png)), rgb)
    big_endian = Image.frombytes("I;16B", (7, 1), values.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(ip.load_image(big_endian)), rgb)


def test_int32_mode():
    eight_bit = Image.fromarray(np.array([[-7, 0, 100, 255]], dtype=np.int32))
    assert np.asarray(ip.load_image(eight_bit))[..., 0].tolist() == [[0, 0, 100, 255]]
    sixteen_bit = Image.fromarray(np.array([[-5, 257, 65535, 70000]], dtype=np.int32))
    assert np.asarray(ip.load_image(sixteen_bit))[..., 0].tolist() == [[0, 1, 255, 255]]


def test_float_mode():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(ip.load_image(unit))[..., 0].tolist() == [[0, 128, 255]]
    wide = Image.fromarray(np.array([[-3.0, 100.6, 300.0, np.nan]], dtype=np.float32))
    assert np.asarray(ip.load_image(wide))[..., 0].tolist() == [[0, 101, 255, 0]]


def test_load_from_path_bytes_and_image(tmp_path):
    img = _noise(40, 30)
    path = tmp_path / "pic.png"
    img.save(path)
    data = path.read_bytes()
    for source in (str(path), path, data, bytearray(data), memoryview(data), Image.open(path)):
        loaded = ip.load_image(source)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(img))


def test_load_jpeg_and_gif(tmp_path):
    jpg = ip.load_image(_encode(_noise(40, 30), "JPEG"))
    assert jpg.mode == "RGB" and jpg.size == (40, 30)
    gif = ip.load_image(_encode(_noise(40, 30).convert("P"), "GIF", transparency=3))
    assert gif.mode == "RGB" and gif.size == (40, 30)


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ip.ImageError, match="notes.png"):
        ip.load_image(path)
    with pytest.raises(ip.ImageError, match="bytes"):
        ip.load_image(b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_names_the_file(tmp_path, fmt):
    data = _encode(_noise(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ip.ImageError, match=f"cut.{fmt.lower()}") as info:
        ip.load_image(str(path))
    assert isinstance(info.value, ValueError)
    with pytest.raises(ip.ImageError, match="truncated"):
        ip.load_image(data[: len(data) // 2])


def test_truncated_lazy_pil_image_is_caught_at_load(tmp_path):
    data = _encode(_noise(64, 64), "PNG")
    path = tmp_path / "lazy.png"
    path.write_bytes(data[: len(data) // 2])
    lazy = Image.open(path)  # header only: PIL has not decoded anything yet
    with pytest.raises(ip.ImageError, match="lazy.png"):
        ip.load_image(lazy)
    lazy.close()


def test_decompression_bomb_refused_by_pil(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20000, 20000))  # 4e8 pixels: above PIL's hard limit
    with pytest.raises(ip.ImageError, match="bomb.png.*decompression bomb") as info:
        ip.load_image(path)
    assert "400000000" in str(info.value)


def test_decompression_bomb_refused_by_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png_header_only(12000, 12000))  # 1.44e8: PIL only warns; our check refuses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ip.ImageTooLargeError,
                           match=r"big.png.*12000x12000 = 144,000,000 pixels, more than the limit of 100,000,000 "
                                 r"\(max_pixels\).*raise max_pixels to accept it"):
            ip.load_image(path, max_pixels=100_000_000)
    with pytest.raises(ip.ImageError, match=r"limit of 100 \(max_pixels\)"):
        ip.load_image(Image.new("RGB", (20, 20)), max_pixels=100)


def test_decompression_bomb_warning_level(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warn_band = _encode(_noise(40, 40), "PNG")  # 1600 pixels: between 1x and 2x PIL's limit
    with pytest.warns(Image.DecompressionBombWarning):
        assert ip.load_image(warn_band).size == (40, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ip.ImageError, match="decompression bomb"):
            ip.load_image(warn_band)
    with pytest.raises(ip.ImageError, match="decompression bomb"):
        ip.load_image(_encode(_noise(50, 50), "PNG"))  # 2500 > 2x limit: PIL's error


def test_bad_inputs():
    with pytest.raises(TypeError, match="int"):
        ip.load_image(123)
    with pytest.raises(FileNotFoundError):
        ip.load_image(pathlib.Path("/nonexistent/picture.png"))
    with pytest.raises(ValueError, match="max_pixels"):
        ip.load_image(Image.new("RGB", (2, 2)), max_pixels=0)
