"""Slicing geometry and placeholders (docs/model.md §6) against an independent oracle and hand-checked cases.

The oracle below (``_oracle_*``) is written plainly from the text of docs/model.md §6, separately from
``minicpmv_jax.slicing``; expectations never come from the code under test.
"""

from __future__ import annotations

import math
import random

import pytest

from minicpmv_jax import slicing

S, P = 448, 14


# ----------------------------------------------------------------------------------------------------
# Independent oracle, transcribed from docs/model.md §6.
# ----------------------------------------------------------------------------------------------------


def _oracle_round_side(x, m):
    # "round each side to the nearest multiple of P with Python's round (ties to even), never below P"
    q = round(x / m)
    return m if q * m < m else q * m


def _oracle_fit(w, h, upscale, s=S, p=P):
    if upscale or w * h > s * s:
        r = w / h  # "compute the float r = w / h first"
        hh = int(s / math.sqrt(r))
        ww = int(hh * r)
    else:
        ww, hh = w, h
    return (_oracle_round_side(ww, p), _oracle_round_side(hh, p))


def _oracle_grid(W, H, N, s=S):
    multiple = min(math.ceil(W * H / (s * s)), N)
    if multiple <= 1:
        return None
    candidates = []  # (error, order, grid)
    order = 0
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > N:
            continue
        for cols in range(1, n + 1):
            if n % cols == 0:
                rows = n // cols
                candidates.append((abs(math.log(W / H) - math.log(cols / rows)), order, (cols, rows)))
                order += 1
    return min(candidates)[2]  # smallest error, then the first seen


def _oracle_plan(W, H, N, s=S, p=P):
    """Returns (grid, overview size, slice size or None, refine size or None)."""
    grid = _oracle_grid(W, H, N, s)
    if grid is None:
        return None, _oracle_fit(W, H, True, s, p), None, None
    cols, rows = grid
    Wr = max(round(W / cols) * cols, cols)
    Hr = max(round(H / rows) * rows, rows)
    cell = (Wr / cols, Hr / rows)
    sw, sh = _oracle_fit(cell[0], cell[1], True, s, p)
    return grid, _oracle_fit(W, H, False, s, p), (sw, sh), (sw * cols, sh * rows)


SIZES = [
    (1, 1), (2, 2000), (2000, 2), (10, 1000), (447, 449), (448, 448), (449, 449), (896, 448), (448, 896),
    (1344, 1344), (4000, 3000), (3000, 200), (200, 3000), (640, 480), (1920, 1080), (1080, 1920), (3, 147),
    (14, 14), (13, 13), (100000, 14), (14, 100000), (100000, 1), (1, 100000), (997, 991), (1000, 1),
    (2048, 1536), (3024, 4032), (7, 7), (15, 28), (900, 900), (635, 317), (1792, 448), (448, 1792),
]
NS = [1, 2, 4, 9]


@pytest.mark.parametrize("W,H", SIZES)
@pytest.mark.parametrize("N", NS)
def test_plan_matches_oracle(W, H, N):
    grid, overview, slice_size, refine = _oracle_plan(W, H, N)
    plan = slicing.plan_slices(W, H, N, S, P)
    assert plan.original_size == (W, H)
    assert plan.grid == grid
    assert plan.overview_size == overview
    assert plan.slice_size == slice_size
    assert plan.refine_size == refine
    assert slicing.best_grid(W, H, N, S) == grid


@pytest.mark.parametrize("W,H", SIZES)
@pytest.mark.parametrize("N", NS)
def test_plan_invariants(W, H, N):
    plan = slicing.plan_slices(W, H, N, S, P)
    cols, rows = plan.grid or (0, 0)
    assert plan.num_pieces == 1 + cols * rows
    assert len(plan.piece_sizes) == plan.num_pieces
    assert plan.num_slices <= N and (plan.grid is None or plan.num_slices >= 2)
    for w, h in plan.piece_sizes:
        assert isinstance(w, int) and isinstance(h, int)
        assert w % P == 0 and h % P == 0 and w >= P and h >= P
        # fit targets ≈ S² pixels; rounding each side up by < P/2 + the floor at P bounds the overshoot
        assert w * h <= (S + P) ** 2 or min(w, h) == P and w * h <= S * S + P * max(w, h)
    if plan.grid is not None:
        assert plan.refine_size == (plan.slice_size[0] * cols, plan.slice_size[1] * rows)
        boxes = slicing.slice_boxes(plan)
        assert len(boxes) == cols * rows
        assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == plan.refine_size
        assert all(b[2] - b[0] == plan.slice_size[0] and b[3] - b[1] == plan.slice_size[1] for b in boxes)
    else:
        assert slicing.slice_boxes(plan) == []


def test_random_sizes_match_oracle():
    rng = random.Random(1234)
    for _ in range(3000):
        W = rng.choice([rng.randint(1, 64), rng.randint(1, 3000), rng.randint(1, 20000)])
        H = rng.choice([rng.randint(1, 64), rng.randint(1, 3000), rng.randint(1, 20000)])
        N = rng.randint(1, 12)
        grid, overview, slice_size, refine = _oracle_plan(W, H, N)
        plan = slicing.plan_slices(W, H, N, S, P)
        assert (plan.grid, plan.overview_size, plan.slice_size, plan.refine_size) == (
            grid, overview, slice_size, refine), (W, H, N)


# ----------------------------------------------------------------------------------------------------
# Hand-computed cases (each derivation is in the comment; numbers checked by hand, not by the code).
# ----------------------------------------------------------------------------------------------------


def test_hand_1344x1344_n9():
    # W·H / S² = 1806336 / 200704 = 9 exactly -> multiple = min(9, 9) = 9; candidates 8, 9 (10 > N).
    # log(W/H) = 0. From 8: (1,8),(2,4),(4,2),(8,1) errors log 8, log 2, log 2, log 8; from 9: (3,3) error 0.
    # Overview: 1344² > S² -> r = 1, h' = 448, w' = 448 -> (448, 448).
    # Step 4: W' = round(1344/3)·3 = 1344, cell = (448.0, 448.0) -> fit(upscale) = (448, 448); refine 1344².
    plan = slicing.plan_slices(1344, 1344, 9)
    assert plan.grid == (3, 3)
    assert plan.overview_size == (448, 448)
    assert plan.slice_size == (448, 448)
    assert plan.refine_size == (1344, 1344)
    assert plan.num_pieces == 10


def test_hand_448x448_is_not_sliced():
    # W·H / S² = 1 -> multiple 1 -> no slicing; fit(upscale): r = 1 -> 448 x 448.
    plan = slicing.plan_slices(448, 448, 9)
    assert plan.grid is None and plan.overview_size == (448, 448) and plan.num_pieces == 1


def test_hand_449x449_ties_to_even_in_step4():
    # 449² / S² = 1.0045 -> multiple 2; candidates 2, 3 (1 dropped). log(W/H) = 0:
    # (1,2) and (2,1) both have error log 2 -> the first seen, (1,2), wins; (1,3)/(3,1) have log 3.
    # Overview: r = 1 -> (448, 448).
    # Step 4: W' = 449 (cols 1); H' = round(449/2)·2 = round(224.5)·2 = 224·2 = 448 (ties to even).
    # cell = (449.0, 224.0): r = 2.00446…, 448/sqrt(r) = 316.43 -> h' = 316; w' = int(316·2.00446) = 633.
    # round(633/14) = round(45.21) = 45 -> 630; round(316/14) = round(22.57) = 23 -> 322.
    plan = slicing.plan_slices(449, 449, 9)
    assert plan.grid == (1, 2)
    assert plan.overview_size == (448, 448)
    assert plan.slice_size == (630, 322)
    assert plan.refine_size == (630, 644)


def test_hand_896x448():
    # area / S² = 2 -> multiple 2; candidates 2, 3. log(W/H) = log 2: (2,1) error 0 wins.
    # Overview: area > S² -> r = 2, h' = int(448/1.41421) = int(316.78) = 316, w' = 632;
    # round(632/14) = round(45.14) -> 630; round(316/14) = round(22.57) -> 322.
    # Slices: cell (448.0, 448.0) -> (448, 448); refine (896, 448).
    plan = slicing.plan_slices(896, 448, 9)
    assert plan.grid == (2, 1)
    assert plan.overview_size == (630, 322)
    assert plan.slice_size == (448, 448)
    assert plan.refine_size == (896, 448)


def test_hand_640x480():
    # area / S² = 307200 / 200704 = 1.53 -> multiple 2; candidates 2, 3. log(4/3) = 0.288:
    # (1,2) 0.98, (2,1) 0.405, (1,3) 1.39, (3,1) 0.81 -> (2,1).
    # Overview: r = 4/3, 448/sqrt(r) = 387.98 -> h' = 387; w' = int(387·1.3333) ∈ {515, 516};
    # round(515/14) = round(36.8) and round(516/14) = round(36.9) are both 37 -> 518; round(387/14) = 28 -> 392.
    # Slices: cell (320.0, 480.0), r = 2/3, 448/sqrt(r) = 548.7 -> 548; w' = int(365.3) = 365;
    # round(365/14) = round(26.07) = 26 -> 364; round(548/14) = round(39.14) = 39 -> 546.
    plan = slicing.plan_slices(640, 480, 9)
    assert plan.grid == (2, 1)
    assert plan.overview_size == (518, 392)
    assert plan.slice_size == (364, 546)
    assert plan.refine_size == (728, 546)


def test_hand_4000x3000():
    # area / S² = 59.8 -> multiple min(60, 9) = 9; candidates 8, 9. log(4/3) = 0.288:
    # 8: (2,4) 0.98, (4,2) 0.405; 9: (3,3) 0.288 (best), others larger.
    # Overview: same aspect as 640x480 and area > S² -> (518, 392).
    # Step 4: W' = round(1333.33)·3 = 3999, H' = 3000; cell (1333.0, 1000.0), r = 1.333,
    # 448/sqrt(r) = 388.03 -> 388; w' = int(388·1.333) = int(517.2) = 517; round(36.93) -> 518; round(27.71) -> 392.
    plan = slicing.plan_slices(4000, 3000, 9)
    assert plan.grid == (3, 3)
    assert plan.overview_size == (518, 392)
    assert plan.slice_size == (518, 392)
    assert plan.refine_size == (1554, 1176)
    # With N = 4: multiple 4, candidates 3, 4: (3,1) 0.81, (2,2) 0.288 (best), (4,1) 1.10.
    assert slicing.best_grid(4000, 3000, 4, 448) == (2, 2)
    # With N = 1 the image is never sliced.
    assert slicing.best_grid(4000, 3000, 1, 448) is None


def test_hand_1x1_and_13x13_upscale():
    # Tiny images: multiple = 1 -> fit(upscale): r = 1 -> (448, 448).
    assert slicing.plan_slices(1, 1, 9).overview_size == (448, 448)
    assert slicing.plan_slices(13, 13, 9).overview_size == (448, 448)


def test_hand_3x147_order_of_operations():
    # 441 px -> not sliced; fit(upscale): r = 3/147 (float, just below 1/49), 448/sqrt(r) = 3136.000… -> h' = 3136.
    # w' = int(3136·r) = int(63.99…) = 63 -> round(63/14) = round(4.5) = 4 (ties to even) -> 56.
    # The other order, int(3136·3/147) = int(64.0) = 64 -> round(4.57) = 5 -> 70, is NOT the reference.
    assert slicing.fit(3, 147, 448, 14, upscale=True) == (56, 3136)
    h = int(448 / math.sqrt(3 / 147))
    assert (h, int(h * (3 / 147)), int(h * 3 / 147)) == (3136, 63, 64)


def test_fit_order_of_operations_sweep():
    # Every size where the two orders disagree must follow r = w / h first.
    disagreements = 0
    for w in range(1, 60):
        for h in range(1, 400):
            r = w / h
            hh = int(S / math.sqrt(r))
            other = (_oracle_round_side(int(hh * w / h), P), _oracle_round_side(hh, P))
            got = slicing.fit(w, h, S, P, upscale=True)
            assert got == _oracle_fit(w, h, True)
            disagreements += got != other
    assert disagreements >= 1  # the sweep includes 3x147


def test_fit_keeps_small_sizes_without_upscale():
    # Not upscaled and w·h ≤ S²: sizes are only rounded to multiples of 14 (ties to even), min 14.
    assert slicing.fit(100, 200, S, P, upscale=False) == (98, 196)  # 7.14 -> 7, 14.29 -> 14
    assert slicing.fit(21, 35, S, P, upscale=False) == (28, 28)  # 1.5 -> 2, 2.5 -> 2
    assert slicing.fit(3, 5, S, P, upscale=False) == (14, 14)  # round to 0 -> clamped to P
    assert slicing.fit(448.0, 448.0, S, P, upscale=False) == (448, 448)
    assert slicing.fit(449, 449, S, P, upscale=False) == (448, 448)  # area > S² -> rescaled


def test_extreme_aspect_ratio():
    # 100000 x 14: area 1.4M -> multiple 7 with N = 9; the grid follows the aspect (many columns, one row).
    plan = slicing.plan_slices(100000, 14, 9)
    assert plan.grid == (8, 1)
    # h' = int(448 / sqrt(7142.9)) = 5 -> rounded up to 14; the pieces are one patch high.
    assert plan.overview_size[1] == 14 and plan.slice_size[1] == 14
    assert slicing.plan_slices(100000, 1, 9).grid is None  # 1e5 px < S²


# ----------------------------------------------------------------------------------------------------
# Argument checking
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,name",
    [((0, 10, 9), "width"), ((10, -1, 9), "height"), ((10, 10, 0), "max_slice_nums"), ((10.5, 10, 9), "width")],
)
def test_bad_arguments_are_named(args, name):
    with pytest.raises(ValueError, match=name):
        slicing.plan_slices(*args)


def test_fit_rejects_bad_sizes():
    with pytest.raises(ValueError, match="h"):
        slicing.fit(10, 0, S, P, upscale=True)
    with pytest.raises(ValueError, match="patch_size"):
        slicing.fit(10, 10, S, 0, upscale=True)


# ----------------------------------------------------------------------------------------------------
# Placeholders
# ----------------------------------------------------------------------------------------------------


def test_placeholder_unsliced_with_id():
    text = slicing.image_placeholder(3, None, use_image_id=True, query_num=2)
    assert text == "<image_id>3</image_id><image><unk><unk></image>"


def test_placeholder_unsliced_without_id():
    assert slicing.image_placeholder(0, None, use_image_id=False, query_num=1) == "<image><unk></image>"


def test_placeholder_grid_3x2():
    q = 3
    text = slicing.image_placeholder(1, (3, 2), use_image_id=True, query_num=q)
    piece = "<unk>" * q
    line = f"<slice>{piece}</slice>" * 3
    assert text == f"<image_id>1</image_id><image>{piece}</image>" + line + "\n" + line
    assert text.count("<slice>") == 6 and text.count("\n") == 1


def test_placeholder_default_64_and_counts():
    text = slicing.image_placeholder(0, (2, 2), use_image_id=False)
    assert text.count("<unk>") == 64 * 5
    assert text.count("<image>") == 1 and text.count("</slice>") == 4
    slice_text = "<slice>" + "<unk>" * 64 + "</slice>"
    assert text.split("</image>")[1].split("\n") == [slice_text * 2, slice_text * 2]


def test_placeholder_custom_tokens():
    tokens = slicing.PlaceholderTokens(image_start="[I]", image_end="[/I]", slice_start="[S]", slice_end="[/S]",
                                       image_id_start="[#", image_id_end="#]", unk="?")
    assert slicing.image_placeholder(7, (1, 2), True, 2, tokens) == "[#7#][I]??[/I][S]??[/S]\n[S]??[/S]"


def test_placeholder_rejects_bad_index():
    with pytest.raises(ValueError, match="k"):
        slicing.image_placeholder(-1, None, True)
    with pytest.raises(ValueError, match="grid"):
        slicing.image_placeholder(0, (0, 2), True)
