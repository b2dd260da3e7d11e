"""Image slicing geometry and prompt placeholders of MiniCPM-V 2.6 (docs/model.md §6).

Everything here is a pure function of sizes and integers — no pixels, no PIL — so the geometry can be
tested exhaustively and shared by the image side (:mod:`minicpmv_jax.image_processing`, which resizes
and cuts) and the text side (the processor, which writes one placeholder per image).

Notation (docs/model.md §6 "Image slicing"): the original image is (W, H) pixels, ``S`` is
``scale_resolution`` (448), ``P`` is ``patch_size`` (14) and ``N`` is ``max_slice_nums`` (9). Sizes are
always ``(width, height)`` pairs, as PIL writes them; grids are ``(cols, rows)``.

The arithmetic deliberately mirrors the reference implementation, float for float: ``r = w / h`` is
formed first and ``w' = int(h' * r)`` (``int(h' * w / h)`` differs, e.g. for 3×147), rounding is Python's
``round`` (ties to even), and the slice count uses the float quotient ``W·H / S²``.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = [
    "SlicePlan",
    "PlaceholderTokens",
    "fit",
    "best_grid",
    "plan_slices",
    "slice_boxes",
    "image_placeholder",
]

Size = tuple[int, int]  # (width, height) in pixels
Grid = tuple[int, int]  # (cols, rows)


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_positive_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _round_to_multiple(length: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` (Python ``round`` of the quotient, ties to even), at least ``multiple``."""
    return max(round(length / multiple) * multiple, multiple)


def fit(w: float, h: float, scale_resolution: int, patch_size: int, upscale: bool) -> Size:
    """docs/model.md §6 helper ``fit``: the size, in multiples of ``patch_size``, that a (w, h) region is resized to.

    If ``upscale`` is true or ``w·h > S²``, the region is rescaled to about S² pixels at its aspect ratio:
    ``r = w / h``, ``h' = int(S / sqrt(r))``, ``w' = int(h' * r)`` (both truncating, in that order).
    Otherwise (w, h) is kept. Each side is then rounded to the nearest multiple of P with Python's
    ``round`` (ties to even), never below P. ``w`` and ``h`` may be floats (grid cells in step 4).

    Returns:
      ``(width, height)`` as ints, both positive multiples of ``patch_size``.
    """
    _check_positive_number(w, "w")
    _check_positive_number(h, "h")
    _check_positive_int(scale_resolution, "scale_resolution")
    _check_positive_int(patch_size, "patch_size")
    if upscale or w * h > scale_resolution * scale_resolution:
        r = w / h
        h = int(scale_resolution / math.sqrt(r))
        w = int(h * r)
    return _round_to_multiple(w, patch_size), _round_to_multiple(h, patch_size)


def best_grid(width: int, height: int, max_slice_nums: int, scale_resolution: int) -> Grid | None:
    """docs/model.md §6 steps 1–2: the (cols, rows) grid an image of ``width × height`` is sliced into.

    Step 1: ``multiple = min(ceil(W·H / S²), N)``; ``multiple ≤ 1`` means no slicing (returns None).
    Step 2: candidate counts ``multiple − 1, multiple, multiple + 1`` minus 1 and anything above N; for
    each count n in that order, the factorisations ``n = cols · rows`` with cols = 1, 2, …, n. The grid
    minimising ``|log(W/H) − log(cols/rows)|`` wins; on ties the first one seen wins.
    """
    _check_positive_int(width, "width")
    _check_positive_int(height, "height")
    _check_positive_int(max_slice_nums, "max_slice_nums")
    _check_positive_int(scale_resolution, "scale_resolution")
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    log_ratio = math.log(width / height)
    best: Grid | None = None
    best_error = math.inf
    for n in counts:
        for cols in range(1, n + 1):
            if n % cols:
                continue
            rows = n // cols
            error = abs(log_ratio - math.log(cols / rows))
            if error < best_error:  # strict: the first grid seen wins a tie
                best, best_error = (cols, rows), error
    return best


@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """How one image is cut into pieces (docs/model.md §6 steps 1–4).

    Attributes:
      original_size: (W, H) of the source image.
      overview_size: size of the first piece, the whole image resized (``fit`` with ``upscale`` true when
        the image is not sliced, false when it is).
      grid: (cols, rows) of the slices, or None when the image is not sliced.
      slice_size: size of every slice, or None when not sliced.
      refine_size: size the whole image is resized to before it is cut into the grid,
        ``(slice_w · cols, slice_h · rows)``, or None when not sliced.
    """

    original_size: Size
    overview_size: Size
    grid: Grid | None = None
    slice_size: Size | None = None
    refine_size: Size | None = None

    @property
    def num_slices(self) -> int:
        """Number of slices (0 when not sliced)."""
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def num_pieces(self) -> int:
        """Overview plus slices: the number of 64-token placeholders this image takes."""
        return 1 + self.num_slices

    @property
    def piece_sizes(self) -> list[Size]:
        """(width, height) of every piece in order: overview, then slices row by row."""
        return [self.overview_size] + [self.slice_size] * self.num_slices  # type: ignore[list-item]


def plan_slices(
    width: int, height: int, max_slice_nums: int, scale_resolution: int = 448, patch_size: int = 14
) -> SlicePlan:
    """docs/model.md §6 steps 1–4 for a ``width × height`` image.

    Step 1 (no slicing): the only piece is ``fit(W, H, upscale=True)``.
    Step 3: the overview is ``fit(W, H, upscale=False)``.
    Step 4: W and H are rounded to the nearest multiple of cols / rows (Python ``round``, at least
    cols / rows); the cell ``(W'/cols, H'/rows)`` (floats) gives the slice size ``fit(cell, upscale=True)``;
    the refine size is ``(slice_w · cols, slice_h · rows)``.
    """
    grid = best_grid(width, height, max_slice_nums, scale_resolution)
    _check_positive_int(patch_size, "patch_size")
    if grid is None:
        overview = fit(width, height, scale_resolution, patch_size, upscale=True)
        return SlicePlan(original_size=(width, height), overview_size=overview)
    overview = fit(width, height, scale_resolution, patch_size, upscale=False)
    cols, rows = grid
    cell_w = _round_to_multiple(width, cols) / cols
    cell_h = _round_to_multiple(height, rows) / rows
    slice_size = fit(cell_w, cell_h, scale_resolution, patch_size, upscale=True)
    refine = (slice_size[0] * cols, slice_size[1] * rows)
    return SlicePlan(
        original_size=(width, height),
        overview_size=overview,
        grid=grid,
        slice_size=slice_size,
        refine_size=refine,
    )


def slice_boxes(plan: SlicePlan) -> list[tuple[int, int, int, int]]:
    """Crop boxes ``(left, upper, right, lower)`` of the slices in the refine-sized image.

    Top row first, left to right within a row (docs/model.md §6 step 4); empty when the image is not sliced.
    """
    if plan.grid is None or plan.slice_size is None:
        return []
    cols, rows = plan.grid
    sw, sh = plan.slice_size
    return [(c * sw, r * sh, (c + 1) * sw, (r + 1) * sh) for r in range(rows) for c in range(cols)]


@dataclasses.dataclass(frozen=True)
class PlaceholderTokens:
    """Token strings of the image placeholder; the tokenizer maps them to ids separately."""

    image_start: str = "<image>"
    image_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    image_id_start: str = "<image_id>"
    image_id_end: str = "</image_id>"
    unk: str = "<unk>"


def image_placeholder(
    k: int,
    grid: Grid | None,
    use_image_id: bool,
    query_num: int = 64,
    tokens: PlaceholderTokens = PlaceholderTokens(),
) -> str:
    """The text that replaces the k-th (0-based) image tag of a prompt (docs/model.md §6).

    ``[<image_id>k</image_id> if use_image_id]`` + ``<image>`` + query_num × ``<unk>`` + ``</image>``,
    then, if ``grid`` is not None, one line per grid row joined by ``\\n`` (no newline before the first),
    each line being cols × (``<slice>`` + query_num × ``<unk>`` + ``</slice>``).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (image index) must be a non-negative int, got {k!r}")
    _check_positive_int(query_num, "query_num")
    if grid is not None:
        if len(grid) != 2:
            raise ValueError(f"grid must be (cols, rows) or None, got {grid!r}")
        _check_positive_int(grid[0], "grid cols")
        _check_positive_int(grid[1], "grid rows")
    unks = tokens.unk * query_num
    text = f"{tokens.image_id_start}{k}{tokens.image_id_end}" if use_image_id else ""
    text += f"{tokens.image_start}{unks}{tokens.image_end}"
    if grid is not None:
        cols, rows = grid
        line = f"{tokens.slice_start}{unks}{tokens.slice_end}" * cols
        text += "\n".join([line] * rows)
    return text
