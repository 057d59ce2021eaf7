"""DistributedSignal: tensor and chunked (Zarr or cluster memory) iterates."""

import json

import dask.array as da
import numpy as np
import pytest
import torch

import daskrecon as dr
from daskrecon.errors import ShapeError


def test_chunked_signal_in_a_store(ctx, tmp_path):
    with ctx.client.as_current():
        s = dr.DistributedSignal(ctx, (1, 3, 64, 48), chunks=(1, 3, 32, 16), store=str(tmp_path / "sig"), fits_bytes=0)
        assert isinstance(s.data, da.Array) and s.iteration == 0
        s.update_(da.ones((1, 3, 64, 48), chunks=(1, 1, 20, 20)))
        s.update_(s.array * 3 + 1)  # reads the committed slot while writing the other
        assert s.iteration == 2 and s.array.chunks[2] == (32, 32)
        np.testing.assert_array_equal(s.array.compute(), np.full((1, 3, 64, 48), 4.0, np.float32))
        meta = json.loads((tmp_path / "sig" / "COMMIT.json").read_text())
        assert meta["iteration"] == 2
        fresh = dr.DistributedSignal(ctx, (1, 3, 64, 48), chunks=(1, 3, 32, 16), store=str(tmp_path / "sig")).restore()
        assert fresh.iteration == 2 and isinstance(fresh.data, torch.Tensor)  # small: a tensor
        assert torch.equal(fresh.data, torch.full((1, 3, 64, 48), 4.0))
        with pytest.raises(ShapeError, match=r"shape \(1, 3, 8, 8\)"):
            s.update_(torch.zeros(1, 3, 8, 8))
        assert json.loads((tmp_path / "sig" / "COMMIT.json").read_text())["iteration"] == 2  # refused: untouched


def test_chunked_signal_in_cluster_memory_and_url(ctx, tmp_path):
    with ctx.client.as_current():
        s = dr.DistributedSignal(ctx, (1, 1, 40, 40), init=da.arange(1600, dtype="f4", chunks=400).reshape(1, 1, 40, 40))
        assert s.chunked and s.chunks == (1, 1, 10, 40)
        s.update_(torch.ones(1, 1, 40, 40))
        assert torch.equal(s.data, torch.ones(1, 1, 40, 40))
        u = dr.DistributedSignal(ctx, (1, 1, 16, 16), chunks=(1, 1, 8, 8), store=f"file://{tmp_path}/url-sig")
        u.update_(torch.arange(256.0).reshape(1, 1, 16, 16))
        assert (tmp_path / "url-sig" / "COMMIT.json").is_file()
        assert torch.equal(u.data, torch.arange(256.0).reshape(1, 1, 16, 16))
    with pytest.raises(TypeError, match="complex"):
        dr.DistributedSignal(ctx, (1, 1, 4, 4)).update_(torch.zeros(1, 1, 4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("chunks", [None, (1, 1, 4, 4)])
def test_initial_value_is_stored_as_iteration_zero(ctx, tmp_path, chunks):
    with ctx.client.as_current():
        s = dr.DistributedSignal(ctx, (1, 1, 8, 8), init=torch.full((1, 1, 8, 8), 2.0), chunks=chunks,
                                 store=str(tmp_path / "sig"))
        assert s.iteration == 0
        assert json.loads((tmp_path / "sig" / "COMMIT.json").read_text())["iteration"] == 0
        back = dr.DistributedSignal(ctx, (1, 1, 8, 8), chunks=chunks, store=str(tmp_path / "sig")).restore()
        assert back.iteration == 0 and torch.equal(back.data, torch.full((1, 1, 8, 8), 2.0))
        s.update_(torch.ones(1, 1, 8, 8))
        assert s.iteration == 1 and json.loads((tmp_path / "sig" / "COMMIT.json").read_text())["iteration"] == 1
