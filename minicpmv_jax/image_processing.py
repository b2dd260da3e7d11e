"""The pixel side of MiniCPM-V 2.6 preprocessing (docs/model.md §3, §6): load, convert, resize, cut, normalise.

The geometry (which sizes, which grid) lives in :mod:`minicpmv_jax.slicing`; this module only applies it
to pixels with PIL. Pipeline for one image::

    load_image        PIL image / path / bytes -> validated, fully loaded RGB PIL image
    slice_image       -> [overview, slice(0,0), slice(0,1), …]  (bicubic resizes, docs/model.md §6 steps 1–5)
    to_pixel_values   -> float32 [3, h, w], (x/255 − 0.5)/0.5
    preprocess_image  all of the above -> ProcessedImage

RGB conversion follows the reference (``image.convert('RGB')``) wherever that is faithful, and fixes
PIL's conversions that silently destroy data (high-bit-depth and float images); see :func:`to_rgb`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

from minicpmv_jax import slicing
from minicpmv_jax.errors import ArgumentError

__all__ = [
    "ImageError",
    "ImageTooLargeError",
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "ProcessedImage",
    "load_image",
    "to_rgb",
    "slice_image",
    "to_pixel_values",
    "tgt_size",
    "preprocess_image",
]

# PIL's own hard limit: Image.open raises DecompressionBombError above 2 × Image.MAX_IMAGE_PIXELS
# (2 × 89_478_485 by default) and only warns between 1× and 2×. We refuse at the hard limit ourselves,
# for every kind of input, with a message naming the source.
DEFAULT_MAX_PIXELS = 178_956_970

ImageSource = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview]


class ImageError(ValueError):
    """An input that is not a usable image: unreadable, truncated, too large, or of an unknown mode."""


def _describe(obj: object) -> str:
    """How an image source is named in error messages."""
    if isinstance(obj, (str, os.PathLike)):
        return repr(os.fspath(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, Image.Image):
        filename = getattr(obj, "filename", "")
        return repr(filename) if filename else f"<PIL image mode={obj.mode} size={obj.size[0]}x{obj.size[1]}>"
    return repr(obj)


class ImageTooLargeError(ImageError, ArgumentError):
    """An image with more pixels than the ``max_pixels`` limit allows (a possible decompression bomb)."""


def _check_pixels(img: Image.Image, name: str, max_pixels: int | None) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image {name} is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            "image {name} is {width}x{height} = {pixels:,} pixels, more than the limit of {limit:,} ({}); "
            "refusing it as a possible decompression bomb (raise {} to accept it)", "max_pixels", "max_pixels",
            name=name, width=width, height=height, pixels=width * height, limit=max_pixels)


def _open_and_load(fp: io.IOBase, name: str, max_pixels: int | None) -> Image.Image:
    """Opens ``fp`` with PIL, checks its size from the header, then decodes all pixels."""
    try:
        img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # The warning arrives as an exception only when warnings are turned into errors (-W error).
        raise ImageError(
            f"image {name} refused by PIL as a possible decompression bomb ({err}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS to accept it"
        ) from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(f"{name} is not an image file PIL can read") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"cannot open image {name}: {err}") from err
    _check_pixels(img, name, max_pixels)
    _force_load(img, name)
    return img


def _force_load(img: Image.Image, name: str) -> None:
    """Decodes all pixels now, so a truncated or corrupt file fails here and not in a later resize."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as err:  # PIL's decoders raise OSError, SyntaxError, ValueError, zlib/struct errors…
        raise ImageError(f"cannot decode image {name} (truncated or corrupt?): {type(err).__name__}: {err}") from err


def load_image(obj: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Loads an image from a PIL image, a path or encoded bytes, and returns it as a loaded RGB image.

    Args:
      obj: a ``PIL.Image.Image``, a path (``str`` or ``os.PathLike``), or the encoded file as bytes.
      max_pixels: refuse images with more pixels than this (decompression-bomb guard, checked from the
        header before any pixel is decoded); None disables our check. PIL's own guard still applies
        when opening files and bytes: above ``2 × Image.MAX_IMAGE_PIXELS`` PIL refuses (reported as an
        ImageError); between 1× and 2× PIL only emits a ``DecompressionBombWarning``, which we leave
        alone (no global warnings state is touched) — unless warnings are errors, in which case it is
        reported as an ImageError as well.

    Returns:
      A fully loaded PIL image in mode ``RGB`` (see :func:`to_rgb` for how each mode is converted). A
      PIL image that is already RGB is returned as is (after loading it).

    Raises:
      ImageError: the data is not an image, is truncated or corrupt, is too large (an
        :class:`ImageTooLargeError`), or has a mode that cannot be converted; the message names the source.
      FileNotFoundError / PermissionError: the path cannot be opened.
      TypeError: ``obj`` is of none of the accepted types.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    name = _describe(obj)
    if isinstance(obj, Image.Image):
        _check_pixels(obj, name, max_pixels)
        _force_load(obj, name)
        img = obj
    elif isinstance(obj, (str, os.PathLike)):
        # Our own file object, closed on exit: PIL then never keeps a handle (multi-frame formats would).
        with open(os.path.expanduser(obj), "rb") as fp:
            img = _open_and_load(fp, name, max_pixels)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        img = _open_and_load(io.BytesIO(bytes(obj)), name, max_pixels)
    else:
        raise TypeError(f"image must be a PIL image, a path or bytes, got {type(obj).__name__}")
    return to_rgb(img, name=name)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Maps 0…65535 onto 0…255 by rounding ``x / 257`` (65535 → 255 exactly; 257 is odd, so no ties)."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values + 128) // 257).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), mode="L").convert("RGB")


def to_rgb(img: Image.Image, *, name: str | None = None) -> Image.Image:
    """Converts a loaded PIL image of any mode to ``RGB``.

    - ``RGB``: returned unchanged.
    - 8-bit modes (``1``, ``L``, ``P``, ``RGBA``, ``LA``, ``PA``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``,
      ``RGBX``, ``RGBa``): PIL's ``convert('RGB')``, exactly as the reference does. In particular alpha
      is DROPPED, not composited: a transparent pixel shows the colour stored under it (often black),
      which is what the released model saw in training and what parity with the reference needs.
      Palette images with transparency go through ``RGBA`` first (same pixels, no PIL warning);
      premultiplied ``La`` goes through ``LA``.
    - 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): PIL would clip every value above 255 to
      white; we scale instead, ``round(x / 257)`` so 65535 → 255.
    - 32-bit integer ``I``: if no value exceeds 255 it is taken as 8-bit (PIL's result: negatives clip to
      0); otherwise as 16-bit data (how PIL opens some 16-bit files), clipped to 0…65535 and scaled as above.
    - 32-bit float ``F``: if every value is within 0…1 it is taken as unit intensity and multiplied by
      255; otherwise as 0…255 intensity. Then clipped to 0…255 and rounded to nearest (PIL truncates);
      NaN becomes 0.

    Args:
      img: the image (its pixels are read).
      name: how to name the image in errors; defaults to a description of ``img``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    name = name if name is not None else _describe(img)
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and values.max() > 255:
            return _gray_to_rgb(_scale_16bit(values))
        return _gray_to_rgb(np.clip(values, 0, 255))
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)))
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    if mode == "La":
        return img.convert("LA").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"image {name} has mode {mode!r}, which cannot be converted to RGB: {err}") from err


def slice_image(
    img: Image.Image, max_slice_nums: int, scale_resolution: int = 448, patch_size: int = 14
) -> tuple[list[Image.Image], slicing.SlicePlan]:
    """Cuts an RGB image into its pieces (docs/model.md §6 steps 1–5).

    Returns:
      ``(pieces, plan)``: the overview first, then the slices top row first, left to right; every resize
      is PIL bicubic on the RGB image, and every side is a multiple of ``patch_size``.
    """
    if img.mode != "RGB":
        raise ValueError(f"slice_image needs an RGB image, got mode {img.mode!r} (use load_image or to_rgb first)")
    plan = slicing.plan_slices(img.size[0], img.size[1], max_slice_nums, scale_resolution, patch_size)
    bicubic = Image.Resampling.BICUBIC
    pieces = [img.resize(plan.overview_size, resample=bicubic)]
    if plan.refine_size is not None:
        refine = img.resize(plan.refine_size, resample=bicubic)
        pieces.extend(refine.crop(box) for box in slicing.slice_boxes(plan))
    return pieces, plan


def to_pixel_values(piece: Image.Image, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5)) -> np.ndarray:
    """An RGB piece as float32 ``[3, h, w]`` (C, H, W), normalised per channel ``(x/255 − mean)/std``
    (the released checkpoint's 0.5 / 0.5 map pixels into [−1, 1])."""
    if piece.mode != "RGB":
        raise ValueError(f"to_pixel_values needs an RGB image, got mode {piece.mode!r}")
    x = np.asarray(piece, dtype=np.uint8).astype(np.float32) / np.float32(255.0)  # [h, w, 3]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def tgt_size(piece: Image.Image, patch_size: int = 14) -> tuple[int, int]:
    """The piece's patch grid ``(h / P, w / P)``; both sides must be multiples of ``patch_size``."""
    width, height = piece.size
    if width % patch_size or height % patch_size:
        raise ValueError(f"piece size {width}x{height} is not a multiple of patch_size={patch_size}")
    return height // patch_size, width // patch_size


@dataclasses.dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image ready for the vision tower.

    Attributes:
      pixel_values: per piece (overview, then slices row by row), float32 ``[3, h, w]``.
      tgt_sizes: int32 ``[n_pieces, 2]``, each row ``(h / 14, w / 14)``.
      grid: (cols, rows) of the slices, or None when the image was not sliced.
      image_size: (W, H) of the original image.
    """

    pixel_values: list[np.ndarray]
    tgt_sizes: np.ndarray
    grid: tuple[int, int] | None
    image_size: tuple[int, int]


def preprocess_image(
    obj: ImageSource,
    max_slice_nums: int,
    scale_resolution: int = 448,
    patch_size: int = 14,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> ProcessedImage:
    """load_image → slice_image → to_pixel_values for one image (see those functions)."""
    img = load_image(obj, max_pixels=max_pixels)
    pieces, plan = slice_image(img, max_slice_nums, scale_resolution, patch_size)
    return ProcessedImage(
        pixel_values=[to_pixel_values(p, mean, std) for p in pieces],
        tgt_sizes=np.array([tgt_size(p, patch_size) for p in pieces], dtype=np.int32).reshape(-1, 2),
        grid=plan.grid,
        image_size=plan.original_size,
    )
