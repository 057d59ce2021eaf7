import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from daskrecon.tiling import axis_tiles, blend_weights_1d, default_batch, plan_tiles


@st.composite
def axis_case(draw):
    align = draw(st.sampled_from([1, 1, 2, 8]))
    patch = align * draw(st.integers(1, 12))
    overlap = align * draw(st.integers(0, 6))
    size = draw(st.integers(1, 300))
    return size, patch, overlap, align


@given(axis_case())
@settings(max_examples=400)
def test_cores_cover_the_axis_once_and_windows_hold_their_core_with_context(case):
    size, patch, overlap, align = case
    tiles = axis_tiles(size, patch, overlap, align)
    covered = np.zeros(size, int)
    widths = {t.win_stop - t.win_start for t in tiles}
    assert len(widths) == 1  # all windows of an axis batch together
    for t in tiles:
        covered[t.core_start:t.core_stop] += 1
        assert 0 <= t.win_start <= t.core_start < t.core_stop <= t.win_stop <= size
        if t.win_start > 0:  # not the image border: real context
            assert t.core_start - t.win_start >= overlap
        if t.win_stop < size:
            assert t.win_stop - t.core_stop >= overlap
        if t.win_stop < size or size % align == 0:
            assert t.win_start % align == 0
    assert (covered == 1).all()


@given(axis_case())
def test_one_tile_when_patch_covers_the_axis(case):
    size, patch, overlap, align = case
    assume(size <= patch + 2 * overlap)
    assert [(t.core_start, t.core_stop, t.win_start, t.win_stop) for t in axis_tiles(size, patch, overlap, align)] == [
        (0, size, 0, size)
    ]


@given(st.integers(1, 60), st.integers(1, 60), st.integers(1, 20), st.integers(0, 8))
def test_grid_is_a_partition(h, w, p, o):
    tiles = plan_tiles((h, w), (p, p), (o, o))
    covered = np.zeros((h, w), int)
    for t in tiles:
        covered[t.core()] += 1
        win = np.zeros((h, w), bool)
        win[t.window()] = True
        assert win[t.core()].all()
    assert (covered == 1).all()
    assert [t.index for t in tiles] == list(range(len(tiles)))


@given(axis_case(), st.integers(0, 16))
def test_blend_weights_are_a_partition_of_unity(case, width):
    size, patch, overlap, align = case
    width = min(width, overlap, patch)  # tapers stay inside windows and do not cross a core
    total = np.zeros(size)
    for t in axis_tiles(size, patch, overlap, align):
        total[t.win_start:t.win_stop] += blend_weights_1d(t, size, width)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_default_batch_depends_on_geometry_only():
    assert default_batch(4, 320 * 320) == 1
    assert default_batch(64, 320 * 320) == 8
    assert default_batch(4096, 320 * 320) == 10  # bounded by memory (2**20 window pixels), not by 4096 / 8
    assert default_batch(1, 10) == 1


@pytest.mark.parametrize("args, match", [((0, 4, 1), "axis length"), ((10, 0, 1), "patch_size"), ((10, 4, -1), "overlap"),
                                         ((10, 4, 1, 8), "multiples of align")])
def test_bad_geometry(args, match):
    with pytest.raises(ValueError, match=match):
        axis_tiles(*args)
