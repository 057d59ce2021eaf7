import pytest
import torch

from daskrecon.strategies import BasicStrategy, OverlapTilingStrategy, SmartTilingStrategy, create_strategy


def test_names_and_aliases():
    assert type(create_strategy("smart_tiling", (1, 1, 32, 32))) is OverlapTilingStrategy
    assert SmartTilingStrategy is OverlapTilingStrategy
    assert type(create_strategy("basic", (1, 1, 32, 32), patch_size=8)) is BasicStrategy
    with pytest.raises(ValueError, match="unknown tiling strategy"):
        create_strategy("smart_tiling_3d", (1, 1, 32, 32))


def test_tiling_dims_selects_axes():
    s = OverlapTilingStrategy((1, 3, 40, 40), tiling_dims=(-1,), patch_size=10, overlap=2)
    assert s.tiling_dims == (3,) and s.get_num_patches() == 4
    s2 = OverlapTilingStrategy((1, 3, 40, 40), patch_size=10, overlap=2)
    assert s2.get_num_patches() == 16
    with pytest.raises(ValueError, match="distinct dimensions"):
        OverlapTilingStrategy((1, 3, 40, 40), tiling_dims=(2, -2))
    with pytest.raises(ValueError, match="patch_size has 3 entries"):
        OverlapTilingStrategy((1, 3, 40, 40), patch_size=(8, 8, 8))


def test_patches_batch_and_unbatch_round_trip():
    s = OverlapTilingStrategy((2, 3, 30, 30), patch_size=10, overlap=3)
    x = torch.rand(2, 3, 30, 30)
    pairs = s.get_local_patches(x, list(range(s.get_num_patches())))
    batches = s.apply_batching([p for _, p in pairs], max_batch_size=4)
    assert [b.shape[0] for b in batches] == [8, 8, 2]  # 4 patches x batch 2, ...
    back = s.unpack_batched_results(batches, len(pairs))
    out = torch.zeros_like(x)
    s.reduce_patches(out, [(i, s.trim_patch(i, p)) for (i, _), p in zip(pairs, back)])
    assert torch.equal(out, x)


def test_align_rounds_patch_and_overlap_up():
    s = OverlapTilingStrategy((1, 3, 200, 200), patch_size=60, overlap=20, align=8)
    assert s.patch_size == (64, 64) and s.overlap == (24, 24)
    assert all(t.axes[0].win_start % 8 == 0 for t in s.tiles)
