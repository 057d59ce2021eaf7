"""The loop out of core: iterations streamed from one Zarr slot to the other (engine.loop, engine.signal)."""

import json

import dask.array as da
import numpy as np
import pytest
import torch
import deepinv as dinv

import daskrecon as dr
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.errors import DaskreconError
from daskrecon.runtime.memory import MemoryLimitError
from daskrecon.planning.chunking import working_chunks
from daskrecon.operators.chunkwise import local_form

from helpers import blurs, noisy_measurements, small_dncnn

CH = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def problem(ctx):
    torch.manual_seed(0)
    ops = blurs(2) + [dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3) / 9, padding="reflect")]
    x_true = torch.rand(1, 3, 80, 72)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    dphys = dr.distribute(ops, ctx)
    dden = dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6)
    return ops, x_true, y, dphys, dden


def _dask(ts):
    return [da.from_array(t.numpy(), chunks=CH) for t in ts]


@pytest.mark.parametrize("algorithm", ["pnp", "red"])
def test_streamed_iterations_match_the_in_memory_path(ctx, problem, tmp_path, algorithm):
    ops, x_true, y, dphys, dden = problem
    x0 = torch.full_like(x_true, 0.5)
    with ctx.client.as_current():
        ref = dr.reconstruct(dphys, y, dden, algorithm=algorithm, n_iter=3, step_size=0.3, x0=x0, progress=False)
        out, hist = dr.reconstruct(dphys, _dask(y), dden, algorithm=algorithm, n_iter=3, step_size=0.3,
                                   x0=da.from_array(x0.numpy(), chunks=CH), checkpoint=str(tmp_path / "ck"),
                                   progress=False, x_true=x_true, return_history=True, storage="zarr")
        assert isinstance(out, da.Array)
        got = out.compute()
    assert float((ref - x0).abs().max()) > 0.05  # the iterations moved
    np.testing.assert_allclose(got, ref.numpy(), atol=5e-5)
    assert [h["iteration"] for h in hist] == [1, 2, 3]
    assert all(h["data_fidelity"] > 0 and np.isfinite(h["psnr"]) and h["relative_change"] > 0 for h in hist)
    meta = json.loads((tmp_path / "ck" / "COMMIT.json").read_text())
    assert meta["iteration"] == 3 and len(meta["extra"]["history"]) == 3


def test_resume_after_a_crash_is_bitwise_equal(ctx, problem, tmp_path):
    ops, x_true, y, dphys, dden = problem
    kw = dict(n_iter=4, step_size=0.3, progress=False)
    with ctx.client.as_current():
        full = dr.reconstruct(dphys, _dask(y), dden, checkpoint=str(tmp_path / "a"), **kw).compute()

        def crash(k, x):
            if k == 2:
                raise KeyboardInterrupt("simulated crash after iteration 2")

        with pytest.raises(KeyboardInterrupt):
            dr.reconstruct(dphys, _dask(y), dden, checkpoint=str(tmp_path / "b"), callback=crash, **kw)
        assert Checkpoint(tmp_path / "b").meta()["iteration"] == 2
        with pytest.raises(DaskreconError, match="already holds a checkpoint"):
            dr.reconstruct(dphys, _dask(y), dden, checkpoint=str(tmp_path / "b"), **kw)
        seen = []
        resumed = dr.reconstruct(dphys, _dask(y), dden, checkpoint=str(tmp_path / "b"), resume=True,
                                 callback=lambda k, x: seen.append(k), **kw).compute()
        assert seen == [3, 4]
        assert np.array_equal(resumed, full)
        with pytest.raises(ValueError, match="step_size differ"):
            dr.reconstruct(dphys, _dask(y), dden, checkpoint=str(tmp_path / "b"), resume=True, n_iter=5,
                           step_size=0.2, progress=False)


def test_a_temporary_folder_that_nothing_reads_is_removed(ctx, problem, tmp_path):
    """Out of core without a checkpoint: with tensor inputs the result is a tensor and its folder goes, silently;
    a run that fails in a folder it never named goes too (it cannot be resumed)."""
    import warnings

    ops, x_true, y, dphys, dden = problem
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.3, progress=False, storage="zarr",
                             scratch=str(scratch))
    assert isinstance(out, torch.Tensor) and out.shape == x_true.shape and list(scratch.iterdir()) == []

    def crash(k, x):
        raise KeyboardInterrupt("simulated Ctrl-C")

    with pytest.raises(KeyboardInterrupt):
        dr.reconstruct(dphys, _dask(y), dden, n_iter=3, step_size=0.3, progress=False, storage="zarr",
                       scratch=str(scratch), callback=crash)
    assert list(scratch.iterdir()) == []


def test_without_a_checkpoint_the_iterate_goes_to_a_named_temporary_directory(ctx, problem):
    import pathlib
    import shutil

    ops, x_true, y, dphys, dden = problem
    with ctx.client.as_current(), pytest.warns(UserWarning, match="no checkpoint given") as rec:
        out = dr.reconstruct(dphys, _dask(y), dden, n_iter=1, step_size=0.3, progress=False, storage="zarr")
    where = pathlib.Path(str(rec[0].message).split(" kept in ")[1].split(",")[0])
    assert rec[0].filename == __file__  # points at the user's call, not inside daskrecon
    try:
        assert (where / "COMMIT.json").is_file()
        assert out.shape == x_true.shape and np.isfinite(out.compute()).all()
    finally:
        shutil.rmtree(where)


def test_fsspec_url_checkpoint(ctx, problem, tmp_path):
    ops, x_true, y, dphys, dden = problem
    with ctx.client.as_current():
        out = dr.reconstruct(dphys, _dask(y), dden, n_iter=1, step_size=0.3, progress=False,
                             checkpoint=f"file://{tmp_path}/remote")
        assert out.shape == x_true.shape and np.isfinite(out.compute()).all()
    assert (tmp_path / "remote" / "COMMIT.json").is_file()


def test_refusals_write_nothing(ctx, problem, tmp_path):
    ops, x_true, y, dphys, dden = problem
    bad = [t.clone() for t in y]
    bad[1][0, 0, 3, 3] = float("nan")
    with ctx.client.as_current():
        with pytest.raises(ValueError, match=r"y\[1\] has 1 non-finite"):
            dr.reconstruct(dphys, _dask(bad), dden, n_iter=1, step_size=0.3, progress=False,
                           checkpoint=str(tmp_path / "nan"))
        # A whole-image operator on an image no worker can hold: refused before anything runs or is written.
        dden = dr.distribute(small_dncnn(1), ctx, patch_size=16, overlap=6)  # grey, as these images
        tomo = dr.distribute([dinv.physics.Tomography(angles=4, img_width=16)], ctx)
        huge = (1, 1, 60000, 60000)
        with pytest.raises(MemoryLimitError, match=r"operators \[0\] \(no chunk-wise form\) run on the whole image"):
            dr.reconstruct(tomo, [da.zeros((1, 1, 60000, 4), dtype="f4")], dden, n_iter=1, step_size=0.3,
                           progress=False, x0=da.zeros(huge, dtype="f4", chunks=4096), checkpoint=str(tmp_path / "tomo"))
        # A Downsampling that would stream at another size: the refusal says which size would.
        down = dr.distribute([dinv.physics.Downsampling(img_size=(1, 60002, 60002), filter=None, factor=4)], ctx)
        with pytest.raises(MemoryLimitError, match=r"Downsampling by 4 of a 60002×60002 image: .* multiples of 4"):
            dr.reconstruct(down, [da.zeros((1, 1, 15001, 15001), dtype="f4", chunks=4096)], dden, n_iter=1,
                           step_size=0.3, progress=False, x0=da.zeros((1, 1, 60002, 60002), dtype="f4", chunks=4096),
                           checkpoint=str(tmp_path / "down"))
    assert not any((tmp_path / d).exists() for d in ("nan", "tomo", "down"))


def test_working_chunks_are_regular_and_valid():
    forms = [local_form(dinv.physics.Downsampling(img_size=(3, 100, 100), filter="gaussian", factor=4))]
    c = working_chunks((1, 3, 100, 90), ((1,), (3,), (30, 30, 30, 10), (25, 25, 25, 15)), forms)
    for axis, total in ((2, 100), (3, 90)):
        sizes = c[axis]
        assert sum(sizes) == total and len(set(sizes[:-1])) <= 1 and sizes[0] % 4 == 0
        assert sizes[0] >= forms[0].min_chunk(len(sizes))


@pytest.mark.parametrize("total, asked", [(67, 10), (93, 10), (67, 7), (40, 13), (64, 16), (100, 3)])
def test_one_asked_size_gets_chunks_every_operator_can_run_on(total, asked):
    """``chunks=(h, w)`` arrives as one size per axis: the halo each chunk needs is the one of an axis
    cut into several chunks (it was taken for one chunk: a last chunk of 7 px under a halo of 6 made
    dask's map_overlap rechunk, and the iteration's graph failed with "Shapes do not align")."""
    form = local_form(dinv.physics.Blur(filter=torch.ones(1, 1, 13, 13) / 169, padding="reflect"))  # depth 6
    sizes = working_chunks((1, 3, total, total), ((1,), (3,), (asked,), (asked,)), [form])[2]
    assert sum(sizes) == total and len(set(sizes[:-1])) <= 1
    assert min(sizes) >= form.min_chunk(len(sizes))


DRIVER = """
import sys, time
sys.path.insert(0, {tests!r})
import daskrecon as dr
from helpers import run_solver
if __name__ == "__main__":
    with dr.DistributedContext(n_workers=2, dashboard_address="127.0.0.1:0", torch_threads=1) as ctx, ctx.client.as_current():
        run_solver(ctx, checkpoint={ckpt!r}, chunked=True, callback=lambda k, x: time.sleep(0.2))
"""


def test_driver_killed_mid_iteration_resumes_bitwise_equal(ctx, tmp_path):
    import os

    from helpers import kill_driver_after_commit, run_solver

    ckpt = tmp_path / "ck"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=os.path.dirname(__file__), ckpt=str(ckpt)))
    done = kill_driver_after_commit(script, ckpt, 2, then_sleep=0.3)  # into the next streamed write
    assert 2 <= done < 8
    with ctx.client.as_current():
        resumed = run_solver(ctx, checkpoint=str(ckpt), resume=True, chunked=True)
        assert torch.equal(resumed, run_solver(ctx, checkpoint=str(tmp_path / "full"), chunked=True))


def _blur_and_mask(ctx):
    """A reflect blur and an image-sized Inpainting mask on 1×3×64², their measurements, a small DnCNN."""
    torch.manual_seed(0)
    x_true = torch.rand(1, 3, 64, 64)
    ops = [dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3) / 9, padding="reflect"),
           dinv.physics.Inpainting(img_size=(3, 64, 64), mask=0.5, rng=torch.Generator().manual_seed(2))]
    y = noisy_measurements(ops, x_true, sigma=0.02)
    return x_true, ops, y, dr.distribute(small_dncnn(3), ctx, patch_size=16, overlap=6)


def test_an_out_of_core_run_sends_no_whole_operator_to_a_worker(ctx, tmp_path):
    """Only the chunk-wise forms run: an image-sized Inpainting mask never reaches a worker whole."""
    from distributed import get_task_stream

    x_true, ops, y, dden = _blur_and_mask(ctx)
    kw = dict(n_iter=2, step_size=0.5, progress=False)
    with ctx.client.as_current():
        dphys = dr.distribute(ops, ctx)
        with get_task_stream(ctx.client) as ts:
            out = dr.reconstruct(dphys, _dask(y), dden, x0=da.from_array(y[0].numpy(), chunks=CH),
                                 checkpoint=str(tmp_path / "ck"), **kw).compute()
        ref = dr.reconstruct(dr.distribute(ops, ctx), y, dden, x0=y[0].clone(), **kw)
    ran = {str(t["key"][0] if isinstance(t["key"], tuple) else t["key"]) for t in ts.data}
    assert ran and not [k for k in ran if k.startswith("physics-")]
    np.testing.assert_allclose(out, ref.numpy(), atol=5e-5)
    assert float((ref - y[0]).abs().max()) > 0.05


def test_out_of_core_graphs_read_the_driver_inputs_from_the_store(ctx, tmp_path, monkeypatch):
    """Tensor measurements, an Inpainting mask and x_true are written to the store once; no
    iteration's graph carries them (they would be image-sized data through the scheduler)."""
    import pickle

    x_true, ops, y, dden = _blur_and_mask(ctx)
    kw = dict(n_iter=3, step_size=0.5, progress=False, x_true=x_true, return_history=True)
    sizes, persist = [], ctx.client.persist

    def recording(collections, *args, **kwargs):
        graph = {}
        for c in collections if isinstance(collections, (list, tuple)) else [collections]:
            graph.update(dict(c.__dask_graph__()))
        sizes.append(len(pickle.dumps(graph, protocol=5)))
        return persist(collections, *args, **kwargs)

    with ctx.client.as_current():
        dphys = dr.distribute(ops, ctx)
        ref, ref_hist = dr.reconstruct(dphys, y, dden, x0=y[0].clone(), **kw)
        monkeypatch.setattr(ctx.client, "persist", recording)
        out, hist = dr.reconstruct(dphys, y, dden, x0=y[0].clone(), checkpoint=str(tmp_path / "ck"),
                                   storage="zarr", **kw)
        monkeypatch.undo()
    image = x_true.numpy().nbytes  # the inputs: 2 measurements + x_true + a bool mask = 3.25 images
    assert len(sizes) == 4, sizes  # iteration 0 (the start) and 3 iterations
    assert sizes[0] < 1.25 * image, sizes  # the start carries x0 (a tensor), once
    assert max(sizes[1:]) < image / 4, sizes
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=5e-5)
    assert float((ref - y[0]).abs().max()) > 0.05
    np.testing.assert_allclose([h["psnr"] for h in hist], [h["psnr"] for h in ref_hist], rtol=1e-4)
    assert not list((tmp_path / "ck").glob("input_*"))  # removed at the end


@pytest.mark.parametrize("algorithm, constant", [("sirt", "column_sums"), ("mlem", "sensitivity")])
def test_constant_state_is_written_into_both_slots_then_never_again(ctx, problem, tmp_path, monkeypatch,
                                                                      algorithm, constant):
    """Column sums and sensitivities do not change: out of core they are written by a run's first two
    commits (both slots), not by every iteration; a resumed run writes them twice again."""
    ops, x_true, y, dphys, dden = problem
    y = [t.clamp(min=0) for t in y]
    written = []
    real = Checkpoint.store_tasks
    monkeypatch.setattr(Checkpoint, "store_tasks", lambda self, arrays: (written.append(sorted(arrays)),
                                                                        real(self, arrays))[1])
    opts = dict(algorithm=algorithm, storage="zarr", chunks=(40, 36), progress=False)
    ck = str(tmp_path / "ck")
    dr.reconstruct(dphys, _dask(y), None, n_iter=4, checkpoint=ck, **opts)
    assert [constant in names for names in written] == [True, True, False, False, False]  # the start + 4
    assert all("x" in names for names in written)
    written.clear()
    resumed = dr.reconstruct(dphys, _dask(y), None, n_iter=7, checkpoint=ck, resume=True, **opts)
    assert [constant in names for names in written] == [True, True, False]
    whole = dr.reconstruct(dphys, _dask(y), None, n_iter=7, checkpoint=str(tmp_path / "whole"), **opts)
    assert np.array_equal(np.asarray(resumed), np.asarray(whole)) and float(np.abs(np.asarray(whole)).max()) > 0


def test_a_ctrl_c_mid_run_leaves_the_users_own_arrays_on_the_cluster(ctx, problem):
    """A real SIGINT while pipelined iterations are in flight. distributed's ``client.cancel`` of the
    persisted iterate (whose dependents are the next iteration's intermediate tasks) tripped an assertion
    on the scheduler, which dropped the client's connection: every future the client held was cancelled,
    the user's own persisted arrays with them ("lost dependencies")."""
    import os
    import signal
    import threading
    import time

    ops, x_true, y, dphys, dden = problem
    client = ctx.client
    mine = client.persist(da.arange(100, chunks=10) * 3)  # the user's own data, on the same client
    expected = int((np.arange(100) * 3).sum())
    assert int(client.compute(mine.sum()).result()) == expected
    dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.3, progress=False)  # warm: operators and model placed
    armed = threading.Event()

    def interrupt(signum, frame):
        if armed.is_set():  # a late timer never ends the test session
            armed.clear()
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        armed.set()
        timer.start()
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            dr.reconstruct(dphys, y, dden, n_iter=500, step_size=0.3, progress=False)
        assert time.perf_counter() - t0 < 60
    finally:
        armed.clear()
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert int(client.compute(mine.sum()).result()) == expected  # still there, not "lost dependencies"
    deadline = time.monotonic() + 10  # and nothing of the interrupted run is left running
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(client.processing().values())
    out = dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.3, progress=False)
    ref = dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.3, progress=False)
    assert torch.equal(out, ref)
