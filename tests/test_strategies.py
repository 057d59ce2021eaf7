import pytest
import torch

from daskrecon.planning.strategies import BasicStrategy, OverlapTilingStrategy, SmartTilingStrategy, create_strategy


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


@pytest.mark.parametrize("uniform", [True, False])
def test_patches_batch_and_unbatch_round_trip(uniform):
    s = OverlapTilingStrategy((2, 3, 30, 30), patch_size=10, overlap=3, uniform_windows=uniform)
    x = torch.rand(2, 3, 30, 30)
    out = torch.zeros_like(x)
    for idx in s.batches(4):
        pairs = s.get_local_patches(x, idx)
        batches = s.apply_batching([p for _, p in pairs], max_batch_size=4)
        assert all(b.shape[0] == 2 * len(idx) for b in batches)  # 2 samples per patch
        back = s.unpack_batched_results(batches, len(pairs))
        s.reduce_patches(out, [(i, s.trim_patch(i, p)) for (i, _), p in zip(pairs, back)])
    assert torch.equal(out, x)
    sizes = {tuple(p.shape) for _, p in s.get_local_patches(x, range(9))}
    assert sizes == ({(2, 3, 16, 16)} if uniform else {(2, 3, 13, 13), (2, 3, 13, 16), (2, 3, 16, 13), (2, 3, 16, 16)})
    assert s.processed_pixels() == (9 * 16 * 16 if uniform else (13 + 16 + 13) ** 2)


def test_align_rounds_patch_and_overlap_up():
    s = OverlapTilingStrategy((1, 3, 200, 200), patch_size=60, overlap=20, align=8)
    assert s.patch_size == (64, 64) and s.overlap == (24, 24)
    assert all(t.axes[0].win_start % 8 == 0 for t in s.tiles)


def test_deepinv_05_create_strategy_and_tiling_strategy():
    import warnings

    from daskrecon.planning.strategies import TilingStrategy

    assert TilingStrategy is OverlapTilingStrategy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no tiling_dims" warning here
        s = create_strategy((1, 3, 40, 40), patch_size=10, overlap=2)
    assert type(s) is OverlapTilingStrategy and s.get_num_patches() == 16
    assert create_strategy((1, 3, 40, 40), (-1,), patch_size=10, overlap=2).get_num_patches() == 4
    same = create_strategy((1, 3, 40, 40), patch_size=10, overlap=2, stride=8, pad_mode="reflect")
    assert same.get_num_patches() == 16  # stride <= patch: the same tiled result, pad_mode: nothing is padded
    with pytest.raises(ValueError, match="stride"):
        create_strategy((1, 3, 40, 40), patch_size=10, overlap=2, stride=12)  # deepinv leaves holes
