import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from daskrecon.planning.tiling import axis_tiles, batch_tiles, blend_weights_1d, default_batch, plan_tiles


@st.composite
def axis_case(draw):
    align = draw(st.sampled_from([1, 1, 2, 8]))
    patch = align * draw(st.integers(1, 12))
    overlap = align * draw(st.integers(0, 6))
    size = draw(st.integers(1, 300))
    return size, patch, overlap, align


@given(axis_case(), st.booleans())
@settings(max_examples=400)
def test_cores_cover_the_axis_once_and_windows_hold_their_core_with_context(case, uniform):
    size, patch, overlap, align = case
    tiles = axis_tiles(size, patch, overlap, align, uniform)
    covered = np.zeros(size, int)
    widths = {t.win_stop - t.win_start for t in tiles}
    if uniform:
        assert len(widths) == 1  # all windows of an axis batch together
    elif len(tiles) > 1:  # minimal: exactly core ± overlap, clipped to the image
        assert all((t.win_start, t.win_stop) == (max(t.core_start - overlap, 0), min(t.core_stop + overlap, size))
                   for t in tiles)
    for t in tiles:
        covered[t.core_start:t.core_stop] += 1
        assert 0 <= t.win_start <= t.core_start < t.core_stop <= t.win_stop <= size
        if t.win_start > 0:  # not the image border: real context
            assert t.core_start - t.win_start >= overlap
        if t.win_stop < size:
            assert t.win_stop - t.core_stop >= overlap
        if t.win_stop < size or size % align == 0 or not uniform:
            assert t.win_start % align == 0
    assert (covered == 1).all()


@given(axis_case(), st.booleans())
def test_one_tile_when_patch_covers_the_axis(case, uniform):
    size, patch, overlap, align = case
    assume(size <= patch + 2 * overlap)
    tiles = axis_tiles(size, patch, overlap, align, uniform)
    assert [(t.core_start, t.core_stop, t.win_start, t.win_stop) for t in tiles] == [(0, size, 0, size)]


@given(st.integers(1, 80), st.integers(1, 80), st.integers(1, 20), st.integers(0, 8), st.integers(1, 5))
def test_batches_group_equal_windows_and_cover_every_tile_once(h, w, p, o, per):
    tiles = plan_tiles((h, w), (p, p), (o, o))
    batches = batch_tiles(tiles, per)
    assert sorted(i for b in batches for i in b) == list(range(len(tiles)))
    for b in batches:
        assert 1 <= len(b) <= per
        assert len({tuple(tiles[i].axes[k].win_stop - tiles[i].axes[k].win_start for k in range(2)) for i in b}) == 1


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
    for uniform in (False, True):
        total[:] = 0
        for t in axis_tiles(size, patch, overlap, align, uniform):
            total[t.win_start:t.win_stop] += blend_weights_1d(t, size, width)
        np.testing.assert_allclose(total, 1.0, atol=1e-12)
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
