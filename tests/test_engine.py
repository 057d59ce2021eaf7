"""The one engine: an iteration is one graph of constant size, the image stays on the cluster, any cluster size."""

import time

import dask.array as da
import numpy as np
import pytest
import torch
from dask.sizeof import sizeof

import daskrecon as dr

from helpers import GraphSizes, blurs, noisy_measurements, small_dncnn


def _problem(size=64, seed=0):
    torch.manual_seed(seed)
    ops = blurs(3)
    x_true = torch.rand(1, 3, size, size)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    return ops, x_true, y, small_dncnn(3)


@pytest.mark.parametrize("ops_kind", ["whole", "chunk-wise"])
def test_iterations_are_constant_graphs_and_send_no_image_to_the_driver(ctx, monkeypatch, ops_kind):
    ops, x_true, y, model = _problem()
    d = dr.distribute(ops, ctx, fast_operators=(ops_kind == "whole"))  # circular blurs: FFT on a worker, or chunk-wise
    den = dr.distribute(model, ctx, patch_size=16, overlap=6)
    client = ctx.client
    received: list[int] = []
    original = client._gather

    async def counting(futures, *args, **kwargs):
        out = await original(futures, *args, **kwargs)
        received.append(sum(sizeof(v) for v in (out if isinstance(out, (list, tuple)) else [out])))
        return out

    per_iteration: dict[int, int] = {}
    tasks: dict[int, int] = {}

    def mark(k, x):
        per_iteration[k] = sum(received)
        received.clear()
        tasks[k] = sum(client.run_on_scheduler(GraphSizes.take))

    client.register_plugin(GraphSizes.Plugin())
    monkeypatch.setattr(client, "_gather", counting)
    n = 10
    _, hist = dr.reconstruct(d, y, den, n_iter=n, step_size=0.3, progress=False, callback=mark, x_true=x_true,
                             return_history=True, chunks=(32, 32))
    monkeypatch.undo()
    image = x_true.numel() * 4
    assert all(b < image / 20 for k, b in per_iteration.items() if k > 1), per_iteration  # metrics only
    assert tasks[2] == tasks[n] > 0 and len(set(tasks[k] for k in range(2, n + 1))) == 1, tasks  # one graph, same size
    assert len(hist) == n and all(np.isfinite(h["psnr"]) and h["data_fidelity"] > 0 for h in hist)


@pytest.mark.parametrize("algorithm", ["pnp", "red", "fista", "fista-red", "hqs", "admm", "admm-cg", "os-pnp", "svrg",
                                       "mlem", "osem", "sirt", "bsrem"])
def test_results_are_bitwise_the_same_on_1_2_3_workers_and_in_either_storage(ctx1, ctx, ctx3, tmp_path, algorithm):
    # hqs/admm: circular blurs, so their prox is the closed form by default; "admm-cg" iterates
    ops, x_true, y, model = _problem(size=72)
    kw = dict(n_iter=3, step_size=0.3, progress=False, chunks=(32, 32), algorithm=algorithm.removesuffix("-cg"))
    if algorithm.endswith("-cg"):
        kw.update(prox_solver="cg", cg_max_iter=4)  # iterates (4 CG steps per prox): the bits are the claim
    if algorithm in ("os-pnp", "svrg", "osem", "bsrem"):
        kw["n_subsets"] = 2
    if algorithm == "sirt":  # no prior; its own step
        kw.pop("step_size")

    def den(c):
        return None if algorithm == "sirt" else dr.distribute(model, c, patch_size=16, overlap=6)

    outs = []
    for c in (ctx1, ctx, ctx3):
        out = dr.reconstruct(dr.distribute(ops, c), y, den(c), **kw)
        outs.append(out)
    streamed = dr.reconstruct(dr.distribute(ops, ctx), y, den(ctx), storage="zarr", checkpoint=str(tmp_path / "ck"),
                              **kw)
    assert all(torch.equal(o, outs[0]) for o in outs[1:] + [streamed])
    assert float((outs[0] - y[0]).abs().max()) > 0.05


def test_workers_joining_and_leaving_mid_run_change_nothing():
    """An adaptive cluster (dask-jobqueue) adds and retires workers during a reconstruction."""
    ops, x_true, y, model = _problem(size=64)
    with dr.DistributedContext(n_workers=1, dashboard_address="127.0.0.1:0", torch_threads=1) as ctx:
        cluster, client = ctx.cluster, ctx.client

        def run(callback=None):
            return dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(model, ctx, patch_size=16, overlap=6),
                                  n_iter=6, step_size=0.3, progress=False, callback=callback, chunks=(32, 32))

        quiet = run()
        sizes = []

        def elastic(k, x):
            if k == 2:
                cluster.scale(3)
                client.wait_for_workers(3, timeout=60)
            elif k == 4:
                cluster.scale(1)
                deadline = time.monotonic() + 60
                while len(client.scheduler_info(n_workers=-1)["workers"]) > 1 and time.monotonic() < deadline:
                    time.sleep(0.1)
            sizes.append(ctx.num_workers)

        disturbed = run(elastic)
    assert 3 in sizes and sizes[-1] == 1
    assert torch.equal(disturbed, quiet)


def test_dask_inputs_stay_lazy_and_on_the_cluster(ctx):
    ops, x_true, y, model = _problem()
    with ctx.client.as_current():
        ys = [da.from_array(t.numpy(), chunks=(1, 3, 32, 32)) for t in y]
        out = dr.reconstruct(dr.distribute(ops, ctx), ys, dr.distribute(model, ctx, patch_size=16, overlap=6),
                             n_iter=2, step_size=0.3, progress=False)
        assert isinstance(out, da.Array)
        ref = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(model, ctx, patch_size=16, overlap=6),
                             n_iter=2, step_size=0.3, progress=False, x0=torch.from_numpy(
                                 (sum(o.A_adjoint(t) for o, t in zip(ops, y)) / 3).numpy()))
        np.testing.assert_allclose(out.compute(), ref.numpy(), atol=1e-5)


def _volume_problem(seed=0):
    import deepinv as dinv

    g = torch.Generator().manual_seed(seed)
    k1 = torch.rand(1, 1, 3, 5, 5, generator=g)
    k2 = torch.rand(1, 1, 5, 3, 3, generator=g)
    ops = [dinv.physics.Blur(filter=k1 / k1.sum(), padding="reflect"),
           dinv.physics.Blur(filter=k2 / k2.sum(), padding="circular")]
    x_true = torch.rand(1, 1, 24, 20, 22, generator=g)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    return ops, x_true, y, small_dncnn(1, depth=3, dim=3)


@pytest.mark.parametrize("algorithm", ["pnp", "hqs"])
def test_a_volume_runs_chunk_wise_like_deepinv_on_the_whole_volume(ctx1, ctx, tmp_path, algorithm):
    """(B, C, D, H, W): 3-D blurs chunk by chunk, a 3-D DnCNN tiled inside chunks, in memory and out of core."""
    import deepinv as dinv
    from deepinv.optim import L2

    ops, x_true, y, model = _volume_problem()
    x0 = torch.zeros_like(x_true)
    n = 3 if algorithm == "pnp" else 2
    kw = dict(algorithm=algorithm, n_iter=n, step_size=0.3, x0=x0, progress=False, chunks=(12, 10, 11))
    outs = []
    for c in ((ctx1, ctx) if algorithm == "pnp" else (ctx,)):  # HQS across worker counts: tests in 2-D
        d = dr.distribute(ops, c)
        assert all(f is not None for f in d.chunkwise_forms())  # chunk-wise forms of the 3-D blurs
        outs.append(dr.reconstruct(d, y, dr.distribute(model, c, patch_size=8, overlap=3), **kw))
    ys = [da.from_array(t.numpy(), chunks=(1, 1, 12, 10, 11)) for t in y]
    with ctx.client.as_current():
        streamed = dr.reconstruct(dr.distribute(ops, ctx), ys, dr.distribute(model, ctx, patch_size=8, overlap=3),
                                  storage="zarr", checkpoint=str(tmp_path / "ck"), **kw).compute()
    assert torch.equal(outs[0], outs[-1]) and torch.equal(torch.from_numpy(streamed), outs[0])
    stacked, x = dinv.physics.stack(*ops), x0.clone()
    with torch.no_grad():
        for _ in range(n):
            if algorithm == "pnp":
                x = model(x - 0.3 * L2().grad(x, y, stacked))
            else:
                stacked.set_ls_solver("CG", max_iter=100, tol=1e-6)
                x = model(L2().prox(x, y, stacked, gamma=0.3))
    assert float((outs[0] - x).abs().max()) <= 1e-4
    assert float((outs[0] - x_true).abs().max()) > 0 and float(outs[0].abs().max()) > 0.05


@pytest.mark.parametrize("algorithm", ["pnp", "fista"])
def test_pipelined_iterations_are_the_unpipelined_ones_bitwise(ctx, tmp_path, monkeypatch, algorithm):
    """Without a callback, iteration k + 1 is submitted before iteration k's metrics are back; the
    iterates, the history, a tol stop and the checkpoint are those of one iteration at a time."""
    from daskrecon.engine import loop as engine
    from daskrecon.engine.checkpoint import Checkpoint
    from daskrecon.engine.signal import Pending

    ops, x_true, y, model = _problem(size=64)
    dphys, dden = dr.distribute(ops, ctx), dr.distribute(model, ctx, patch_size=16, overlap=6)
    events = []
    submit, finish = engine.submit, Pending.finish

    def logged_submit(*args, **kwargs):
        events.append(("submit", kwargs["iteration"]))
        return submit(*args, **kwargs)

    def logged_finish(self):
        events.append(("finish", self.iteration))
        return finish(self)

    monkeypatch.setattr(engine, "submit", logged_submit)
    monkeypatch.setattr(Pending, "finish", logged_finish)

    def run(n_iter=6, callback=None, **kw):
        events.clear()
        return dr.reconstruct(dphys, y, dden, n_iter=n_iter, step_size=0.3, progress=False, chunks=(32, 32),
                              algorithm=algorithm, x_true=x_true, return_history=True, callback=callback, **kw)

    fast, h_fast = run()
    assert events[:4] == [("finish", 0), ("submit", 1), ("submit", 2), ("finish", 1)], events  # k + 1 before k's metrics
    slow, h_slow = run(callback=lambda k, x: None)
    assert events[:4] == [("finish", 0), ("submit", 1), ("finish", 1), ("submit", 2)], events  # a callback sees its iterate
    assert torch.equal(fast, slow) and h_fast == h_slow
    assert float((fast - y[0]).abs().max()) > 0.05

    changes = [h["relative_change"] for h in h_slow]
    tol = sorted(changes)[2]  # stops before the end
    stop_at = next(i for i, c in enumerate(changes) if c <= tol) + 1
    assert stop_at < 6
    a, ha = run(tol=tol)
    b, hb = run(tol=tol, callback=lambda k, x: None)
    assert len(ha) == len(hb) == stop_at and ha[-1]["stop"] == hb[-1]["stop"] == "tol"
    assert torch.equal(a, b) and ha == hb
    upto, _ = run(n_iter=stop_at, callback=lambda k, x: None)
    assert torch.equal(a, upto)  # the dropped iteration k + 1 left nothing behind

    c, hc = run(checkpoint=str(tmp_path / "ck"), checkpoint_every=2)
    assert torch.equal(c, fast) and hc == h_fast
    meta = Checkpoint(str(tmp_path / "ck")).meta()
    assert meta["iteration"] == 6 and meta["extra"]["history"] == h_fast


def _chunk_wise_pnp_everywhere(ops, y, x0, step, ctx1, ctx, tmp_path, y_chunks):
    """PnP with operators that all stream chunk by chunk: bitwise the same on 1 and 2 workers and out
    of core, and equal to deepinv's PnP on the whole image."""
    import deepinv as dinv
    from deepinv.optim import L2

    model = small_dncnn(3)
    kw = dict(n_iter=3, step_size=step, x0=x0, progress=False, chunks=(20, 26))
    outs = []
    for c in (ctx1, ctx):
        d = dr.distribute(ops, c)
        assert all(f is not None for f in d.chunkwise_forms())
        outs.append(dr.reconstruct(d, y, dr.distribute(model, c, patch_size=16, overlap=6), **kw))
    with ctx.client.as_current():
        ys = [da.from_array(t.numpy(), chunks=y_chunks) for t in y]
        streamed = dr.reconstruct(dr.distribute(ops, ctx), ys, dr.distribute(model, ctx, patch_size=16, overlap=6),
                                  storage="zarr", checkpoint=str(tmp_path / "ck"), **kw).compute()
    assert torch.equal(outs[0], outs[1]) and torch.equal(torch.from_numpy(streamed), outs[0])
    stacked, x = dinv.physics.stack(*ops), x0.clone()
    with torch.no_grad():
        for _ in range(3):
            x = model(x - step * L2().grad(x, y, stacked))
    assert float((outs[0] - x).abs().max()) <= 1e-4
    assert float((outs[0] - x0).abs().max()) > 0.05


def test_deepinvs_default_valid_blur_runs_chunk_wise_in_memory_and_out_of_core(ctx1, ctx, tmp_path):
    """``Blur(filter=k)`` is deepinv's ``padding="valid"``: y is smaller than x. It streams chunk by
    chunk (the zero-padded blur, cropped; its adjoint embeds y in zeros), bitwise the same on 1 and 2
    workers and out of core, and equal to deepinv's PnP on the whole image."""
    import deepinv as dinv

    g = torch.Generator().manual_seed(3)
    k1, k2 = torch.rand(1, 1, 5, 5, generator=g), torch.rand(1, 1, 4, 6, generator=g)
    ops = [dinv.physics.Blur(filter=k1 / k1.sum()), dinv.physics.Blur(filter=k2 / k2.sum()),
           dinv.physics.Blur(filter=k1.transpose(-1, -2) / k1.sum(), padding="circular")]
    x_true = torch.rand(1, 3, 60, 52, generator=g)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    assert y[0].shape == (1, 3, 56, 48) and y[1].shape == (1, 3, 57, 47)
    _chunk_wise_pnp_everywhere(ops, y, torch.full_like(x_true, 0.5), 0.3, ctx1, ctx, tmp_path, (1, 3, 16, 16))


def test_valid_downsampling_runs_chunk_wise_in_memory_and_out_of_core(ctx1, ctx, tmp_path):
    """``Downsampling(padding="valid")``: the kept grid starts at the kernel's half-size, so inside a
    chunk the subsampling has a phase, ``(k - 1) // 2 mod f``: 1 along the 4- and 7-tap axes, 0 along the 5-tap one.
    Chunk by chunk, bitwise the same on 1 and 2 workers and out of core, equal to deepinv's PnP."""
    import deepinv as dinv

    g = torch.Generator().manual_seed(4)
    k1, k2 = torch.rand(1, 1, 4, 4, generator=g), torch.rand(1, 1, 7, 5, generator=g)
    shape = (1, 3, 60, 52)
    ops = [dinv.physics.Downsampling(img_size=shape[1:], filter=k1 / k1.sum(), factor=2, padding="valid"),
           dinv.physics.Downsampling(img_size=shape[1:], filter=k2 / k2.sum(), factor=2, padding="valid"),
           dinv.physics.Blur(filter=k2 / k2.sum(), padding="reflect")]
    x_true = torch.rand(shape, generator=g)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    assert y[0].shape == (1, 3, 29, 25) and y[1].shape == (1, 3, 27, 24)
    _chunk_wise_pnp_everywhere(ops, y, torch.full_like(x_true, 0.5), 0.5, ctx1, ctx, tmp_path, (1, 3, 10, 10))


def test_downsampling_of_an_image_not_a_multiple_of_its_factor_keeps_the_image_size(ctx):
    """deepinv's ``Downsampling(img_size=(3, 30, 30), factor=4)`` maps 30² to 8² and back to 30².
    The chunk-wise form needs sides that are multiples of the factor, and read x's size off y's
    (8 · 4 = 32): the reconstruction came back 32×32, a different problem, silently. Such an
    operator runs whole, and the result is deepinv's."""
    import deepinv as dinv
    from deepinv.optim import L2

    op = dinv.physics.Downsampling(img_size=(3, 30, 30), filter="gaussian", factor=4)
    x_true = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(8))
    y = [op.A(x_true)]
    model = small_dncnn(3)
    out = dr.reconstruct(dr.distribute([op], ctx), y, dr.distribute(model, ctx), n_iter=2, step_size=1.0,
                         progress=False)
    assert out.shape == x_true.shape
    x = op.A_adjoint(y[0])  # the engine's start, Aᵀy / N
    with torch.no_grad():
        for _ in range(2):
            x = model(x - L2().grad(x, y[0], op))
    assert float((out - x).abs().max()) <= 1e-4 and float((out - x_true).abs().max()) > 0


def test_a_failed_out_of_core_run_leaves_its_temporary_folder_removed_after_its_late_writes(ctx, tmp_path):
    """A run that fails (or is interrupted) while other chunks are still being computed: the driver sees
    the error at once, but the tasks that had started run to their end and write their chunks. The
    temporary folder was removed before those writes, which made it again (orphan chunks, no owner
    mark, never removed). The in-flight tasks are now cancelled and waited for before it goes."""
    from daskrecon.errors import WorkerTaskError

    from helpers import Tripping

    torch.manual_seed(0)
    ops = blurs(2)
    x = torch.full((1, 3, 64, 64), 0.1)
    x[..., :32] = 0.9  # the left tiles trip, the right ones take 1.5 s and are written after
    y = noisy_measurements(ops, x, sigma=0.01)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    den = dr.distribute(Tripping(delay=1.5), ctx, patch_size=32, overlap=0)
    with pytest.raises(WorkerTaskError, match="tripped on a bright window"):
        dr.reconstruct(dr.distribute(ops, ctx), y, den, n_iter=2, step_size=0.1, progress=False, storage="zarr",
                       chunks=(32, 32), scratch=str(scratch))
    time.sleep(3)  # past the right tiles' end: any late write would be there now
    assert list(scratch.iterdir()) == []
    assert not any(v for v in ctx.client.processing().values())  # and nothing of the run left running


def test_a_failed_run_in_memory_does_not_keep_the_cluster_busy_through_its_traceback(ctx):
    """Jupyter keeps the last traceback (``sys.last_traceback``), and with it the frames holding the
    iteration's futures: the cluster went on computing the abandoned iteration and holding its
    results. The run's submissions are cancelled when it fails."""
    from daskrecon.errors import WorkerTaskError

    from helpers import Tripping

    ops = blurs(2)
    x = torch.full((1, 3, 64, 64), 0.1)
    x[..., :32] = 0.9
    y = noisy_measurements(ops, x, sigma=0.01)
    d, den = dr.distribute(ops, ctx), dr.distribute(Tripping(delay=1.0), ctx, patch_size=32, overlap=0)
    before = set(ctx.client.futures)
    with pytest.raises(WorkerTaskError, match="tripped") as failure:
        dr.reconstruct(d, y, den, n_iter=3, step_size=0.1, progress=False)
    assert failure.value.__traceback__ is not None  # held, as a notebook holds it
    # what the frames still hold is data already computed (the placed inputs, the last state): nothing
    # of the abandoned iterations, pending or erred
    held = {k: f.status for k, f in ctx.client.futures.items() if k not in before}
    assert all(status == "finished" for status in held.values()), held
