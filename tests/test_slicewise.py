"""Axis-separable operators: a 2-D deepinv operator on every slice of a volume, slab by slab (issue #27)."""

import pickle

import cloudpickle
import dask.array as da
import deepinv as dinv
import numpy as np
import pytest
import torch
from deepinv.optim import L2
from deepinv.physics.functional.blur import gaussian_blur
from helpers import small_dncnn

import daskrecon as dr
from daskrecon.errors import ShapeError
from daskrecon.operators.chunkwise import local_form
from daskrecon.operators.slicewise import SlicewiseOperator
from daskrecon.planning.chunking import plan_chunks, working_chunks
from daskrecon.tasks import slicewise as slab_tasks

ANGLES = torch.linspace(0, 180, 25)[:-1]


def _tomography(angles=ANGLES, width=24):
    # normalize=True draws deepinv's norm estimate at random: build once, reuse the same object
    return dinv.physics.Tomography(angles=angles, img_width=width, circle=False, normalize=True)


def _per_slice(op, method, v):
    return torch.stack([getattr(op, method)(v[:, :, k]) for k in range(v.shape[2])], 2)


def _two_d_operators():
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, 1, 24, 24, generator=g) > 0.5).float()
    return {
        "tomography": _tomography(),
        "mri": dinv.physics.MRI(mask=mask[0, 0], img_size=(2, 24, 24)),
        "blur": dinv.physics.Blur(filter=gaussian_blur(psf_size=(7, 7), sigma=(1.2, 1.2)), padding="reflect"),
        "inpainting": dinv.physics.Inpainting(img_size=(2, 24, 24), mask=mask[0]),
    }


@pytest.mark.parametrize("kind", ["tomography", "mri", "blur", "inpainting"])
def test_slicewise_is_the_operator_applied_slice_by_slice_also_chunk_by_chunk(kind):
    op = _two_d_operators()[kind]
    channels = 1 if kind == "tomography" else 2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, channels, 9, 24, 24, generator=g)
    sw = dr.slicewise(op)
    y = sw.A(x)
    ref = _per_slice(op, "A", x)
    assert y.shape == ref.shape and float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    u = torch.randn(y.shape, generator=g)
    adj, ref_adj = sw.A_adjoint(u), _per_slice(op, "A_adjoint", u)
    assert float((adj - ref_adj).abs().max()) <= 1e-5 * float(ref_adj.abs().max())
    form = local_form(sw)
    assert isinstance(form, SlicewiseOperator)
    xd = da.from_array(x.numpy(), chunks=(1, channels, (4, 3, 2), 12, 12))  # uneven slabs; H, W cut too
    yd = form.apply(xd)
    assert yd.chunks[2] == (4, 3, 2) and yd.numblocks[3:] == (1, 1)
    np.testing.assert_allclose(yd.compute(), ref.numpy(), atol=1e-5 * float(ref.abs().max()))
    ud = da.from_array(u.numpy(), chunks=(1, u.shape[1], 5, -1, -1))
    ad = form.adjoint(ud, xd.chunks)
    assert ad.chunks[2] == (4, 3, 2)
    np.testing.assert_allclose(ad.compute(), ref_adj.numpy(), atol=1e-5 * float(ref_adj.abs().max()))
    if kind == "tomography":  # deepinv's Tomography adjoint is the exact transpose (via backprop)
        lhs, rhs = float((y * u).sum()), float((x * adj).sum())
        assert abs(lhs - rhs) <= 1e-4 * abs(lhs)


def test_gradients_flow_through_the_slicewise_physics_on_tensors():
    """Plain deepinv use (unrolled training, a loss through ``A``) keeps autograd, slice by slice."""
    op = _tomography()
    x = torch.rand(1, 1, 3, 24, 24, requires_grad=True)
    dr.slicewise(op).A(x).square().sum().backward()
    xs = x.detach().clone().requires_grad_(True)
    _per_slice(op, "A", xs).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().max()) > 0
    assert float((x.grad - xs.grad).abs().max()) <= 1e-5 * float(xs.grad.abs().max())


def test_a_batch_of_volumes_is_sliced_per_element():
    op = _tomography()
    x = torch.rand(2, 1, 3, 24, 24)
    ref = _per_slice(op, "A", x)
    assert float((dr.slicewise(op).A(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_a_tomography_travels_as_its_recipe_not_its_grids():
    op = _tomography(angles=60, width=64)
    sw = dr.slicewise(op)
    assert len(cloudpickle.dumps(op)) > 4 * 2**20  # deepinv's sampling grids: ~8 MB
    assert len(pickle.dumps(sw)) < 20_000
    blob = pickle.dumps(sw)
    slab_tasks._OPS.clear()  # as on a worker: nothing built yet in this process
    back = pickle.loads(blob)
    assert back.op is not op  # rebuilt from its recipe
    x = torch.rand(1, 1, 2, 64, 64)
    assert torch.equal(back.A(x), sw.A(x))  # the driver's norm, the same grids: the same bits
    assert torch.equal(back.op.operator_norm, op.operator_norm)


def test_rebuilding_an_operator_leaves_deepinvs_shared_default_noise_model_alone():
    """A rebuilt operator is put in eval mode; deepinv's default ``ZeroNoise()`` is one object shared
    by every physics of the process, the caller's included, and must keep its mode."""
    mine = dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0, 1.0)))
    assert mine.training and mine.noise_model.training
    blob = pickle.dumps(dr.slicewise(_tomography(angles=8, width=16)))
    slab_tasks._OPS.clear()
    back = pickle.loads(blob)
    back.A(torch.rand(1, 1, 2, 16, 16))
    assert not back.op.training and not back.op.noise_model.training  # the rebuilt one is in eval mode
    assert mine.noise_model.training and dinv.physics.Blur(filter=mine.filter).noise_model.training


def test_what_is_not_separable_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="not known to act on each slice alone.*separable=True"):
        dr.slicewise(dinv.physics.LinearPhysics(A=lambda x: x, A_adjoint=lambda y: y))
    assert isinstance(dr.slicewise(dinv.physics.LinearPhysics(A=lambda x: 2 * x, A_adjoint=lambda y: 2 * y),
                                   separable=True), dinv.physics.LinearPhysics)
    with pytest.raises(ValueError, match="3-D MRI"):
        dr.slicewise(dinv.physics.MRI(img_size=(2, 4, 8, 8), three_d=True))
    with pytest.raises(ValueError, match="not one 2-D kernel"):
        dr.slicewise(dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3, 3) / 27))
    with pytest.raises(ValueError, match="axis must be one of"):
        dr.slicewise(_tomography(), axis="width")
    with pytest.raises(TypeError, match="LinearPhysics"):
        dr.slicewise(dinv.physics.Physics(A=lambda x: x ** 2))
    with pytest.raises(ShapeError, match=r"\(B, C, D, H, W\) volumes"):
        dr.slicewise(_tomography()).A(torch.rand(1, 1, 24, 24))


def test_the_iterate_planner_keeps_a_slice_whole():
    form = local_form(dr.slicewise(_tomography(width=96)))
    for shape in [(1, 1, 64, 96, 96), (1, 1, 7, 96, 96), (2, 1, 300, 96, 96)]:
        c = plan_chunks(shape, 4, (16, 16, 16), overlap=(3, 3, 3), whole=form.whole_axes)
        assert c[3] == (96,) and c[4] == (96,) and sum(c[2]) == shape[2]
        w = working_chunks(shape, ((shape[0],), (1,), (5,) * (shape[2] // 5) + ((shape[2] % 5,) if shape[2] % 5
                                                                             else ()), (48, 48), (48, 48)), [form])
        assert w[3] == (96,) and w[4] == (96,) and sum(w[2]) == shape[2]


def _ct_problem(n_ops=3, depth=10, width=24):
    g = torch.Generator().manual_seed(0)
    ops = [dr.slicewise(_tomography(ANGLES[j::n_ops], width)) for j in range(n_ops)]
    x_true = torch.rand(1, 1, depth, width, width, generator=g)
    y = [op.A(x_true) + 0.01 * torch.randn(op.A(x_true).shape, generator=g) for op in ops]
    return ops, x_true, y


def _deepinv_pnp(den, ops, y, x0, n=3, tau=0.5):
    """deepinv's proximal gradient on the stacked physics: ``x ← D(x − τ ∇L2)``, ``n`` times."""
    stacked, x = dinv.physics.StackedLinearPhysics(ops), x0.clone()
    with torch.no_grad():
        for _ in range(n):
            x = den(x - tau * L2().grad(x, dinv.utils.TensorList(y), stacked))
    return x


@pytest.mark.parametrize("algorithm", ["pnp", "fista", "sirt", "osem", "bsrem"])
def test_ct_volume_reconstructs_slab_by_slab_bitwise_on_1_2_3_workers_in_memory_and_out_of_core(
        ctx1, ctx, ctx3, tmp_path, algorithm):
    ops, x_true, y = _ct_problem()
    model = small_dncnn(1, depth=3, dim=3)
    kw = dict(algorithm=algorithm, n_iter=3, progress=False, chunks=(4, 24, 24))
    if algorithm in ("pnp", "fista"):
        kw.update(step_size=0.5, x0=torch.zeros_like(x_true))
    if algorithm in ("osem", "bsrem"):
        y = [v.clamp_min(0) + 0.05 for v in y]  # Poisson data are positive
        kw["n_subsets"] = 3

    def den(c):
        return dr.distribute(model, c, patch_size=8, overlap=3) if algorithm in ("pnp", "fista") else None

    outs = []
    for c in (ctx1, ctx, ctx3):
        d = dr.distribute(ops, c)
        assert all(isinstance(f, SlicewiseOperator) for f in d.chunkwise_forms())
        outs.append(dr.reconstruct(d, y, den(c), **kw))
    ys = [da.from_array(v.numpy(), chunks=(1, 1, 4, -1, -1)) for v in y]
    with ctx.client.as_current():
        streamed = dr.reconstruct(dr.distribute(ops, ctx), ys, den(ctx), storage="zarr",
                                  checkpoint=str(tmp_path / "ck"), **kw)
        assert isinstance(streamed, da.Array) and streamed.chunks[3:] == ((24,), (24,))
        streamed = torch.from_numpy(streamed.compute())
    assert all(torch.equal(o, outs[0]) for o in outs[1:] + [streamed])
    assert float((outs[0] - outs[0].mean()).abs().max()) > 0.05  # not a flat volume


def test_ct_pnp_equals_deepinv_on_the_stacked_slicewise_physics(ctx):
    ops, x_true, y = _ct_problem()
    model = small_dncnn(1, depth=3, dim=3)
    x0 = torch.zeros_like(x_true)
    out = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(model, ctx, patch_size=8, overlap=3),
                         n_iter=3, step_size=0.5, x0=x0, progress=False, chunks=(4, 24, 24))
    x = _deepinv_pnp(model, ops, y, x0)
    assert float((out - x).abs().max()) <= 1e-4 and float(x.abs().max()) > 0.1


def test_ct_sirt_equals_deepinvs_sirt_and_resumes_bitwise_out_of_core(ctx, tmp_path):
    # deepinv's own SIRT object takes one operator (its normalizers call ones_like(y), which a TensorList fails)
    ops, x_true, y = _ct_problem(n_ops=1)
    ref = dinv.optim.SIRT(max_iter=4)(y[0], ops[0])
    one = dr.reconstruct(dr.distribute(ops, ctx), y, None, algorithm="sirt", n_iter=4, progress=False,
                         chunks=(4, 24, 24))
    assert float(torch.linalg.vector_norm(one - ref) / torch.linalg.vector_norm(ref)) <= 1e-5
    ops, x_true, y = _ct_problem()
    out = dr.reconstruct(dr.distribute(ops, ctx), y, None, algorithm="sirt", n_iter=4, progress=False,
                         chunks=(4, 24, 24))
    ys = [da.from_array(v.numpy(), chunks=(1, 1, 4, -1, -1)) for v in y]
    kw = dict(algorithm="sirt", n_iter=4, progress=False, chunks=(4, 24, 24), storage="zarr",
              checkpoint=str(tmp_path / "ck"))

    def crash(k, x):
        if k == 2:
            raise KeyboardInterrupt("simulated crash")

    with ctx.client.as_current():
        with pytest.raises(KeyboardInterrupt):
            dr.reconstruct(dr.distribute(ops, ctx), ys, None, callback=crash, **kw)
        resumed = dr.reconstruct(dr.distribute(ops, ctx), ys, None, resume=True, **kw).compute()
    assert torch.equal(torch.from_numpy(resumed), out)


def test_ct_pnp_with_a_2d_denoiser_slice_by_slice_equals_deepinv(ctx):
    from daskrecon.models import SliceBySlice

    ops, x_true, y = _ct_problem()
    den2d = SliceBySlice(small_dncnn(1, depth=3, dim=2))
    x = torch.rand(1, 1, 4, 24, 24)
    per_slice = torch.stack([den2d.model(x[:, :, k]) for k in range(4)], 2)
    assert float((den2d(x) - per_slice).abs().max()) <= 1e-6
    x0 = torch.zeros_like(x_true)
    out = dr.reconstruct(dr.distribute(ops, ctx), y, dr.distribute(den2d, ctx, patch_size=8, overlap=(0, 3, 3)),
                         n_iter=3, step_size=0.5, x0=x0, progress=False, chunks=(4, 24, 24))
    ref = _deepinv_pnp(den2d, ops, y, x0)
    assert float((out - ref).abs().max()) <= 1e-4 and float(ref.abs().max()) > 0.1


def test_ct_em_keeps_one_slice_of_each_sensitivity_and_resumes_bitwise_out_of_core(ctx, tmp_path):
    """One 2-D operator on every slice: ``Σ A_iᵀ1`` is one slice repeated along the depth, so OSEM keeps
    (and checkpoints) that slice, not a volume per subset; the update broadcasts it."""
    from daskrecon.engine.checkpoint import Checkpoint
    from daskrecon.planning.subsets import partition

    ops, _, y = _ct_problem()
    y = [v.clamp_min(0) + 0.05 for v in y]
    kw = {"algorithm": "osem", "n_subsets": 3, "n_iter": 4, "progress": False, "chunks": (4, 24, 24)}
    ref = dr.reconstruct(dr.distribute(ops, ctx), y, None, **kw)
    ys = [da.from_array(v.numpy(), chunks=(1, 1, 4, -1, -1)) for v in y]

    def crash(k, x):
        if k == 2:
            raise KeyboardInterrupt("simulated crash")

    ck = str(tmp_path / "ck")
    with ctx.client.as_current():
        with pytest.raises(KeyboardInterrupt):
            dr.reconstruct(dr.distribute(ops, ctx), ys, None, storage="zarr", checkpoint=ck, callback=crash, **kw)
        resumed = dr.reconstruct(dr.distribute(ops, ctx), ys, None, storage="zarr", checkpoint=ck, resume=True,
                                 **kw).compute()
    assert torch.equal(torch.from_numpy(resumed), ref) and float(ref.std()) > 0.05
    store = Checkpoint(ck)
    assert store.open_array("r", "x").shape == (2, 1, 1, 10, 24, 24)  # two slots of the volume
    for j, members in enumerate(partition(len(ops), 3)):
        assert store.open_array("r", f"sensitivity_{j}").shape == (2, 1, 1, 1, 24, 24)  # two slots of one slice
        kept = torch.from_numpy(np.asarray(store.committed(f"sensitivity_{j}").compute()))
        whole = sum(ops[i].A_adjoint(torch.ones_like(y[i])) for i in members)  # deepinv's, on the volume
        assert float((whole - kept).abs().max()) <= 1e-5 * float(whole.abs().max())
        assert float(whole.std()) > 0  # not a flat slice


def test_a_checkpoint_whose_sensitivities_are_volumes_is_not_resumed_as_one_with_slices(ctx, tmp_path, monkeypatch):
    """A checkpoint written with whole-volume sensitivities (as before they were kept as one slice) is another
    run's: resuming it is refused, naming the state's layout, instead of reading arrays of another shape."""
    from daskrecon.engine.checkpoint import Checkpoint, CheckpointMismatchError
    from daskrecon.engine.problem import Problem

    ops, _, y = _ct_problem()
    ys = [da.from_array(v.clamp_min(0).numpy() + 0.05, chunks=(1, 1, 4, -1, -1)) for v in y]
    kw = {"algorithm": "osem", "n_subsets": 3, "progress": False, "chunks": (4, 24, 24), "storage": "zarr",
          "checkpoint": str(tmp_path / "ck")}
    with ctx.client.as_current():
        with monkeypatch.context() as m:
            m.setattr(Problem, "invariant_axes", lambda self, indices=None: ())  # the layout before: volumes
            dr.reconstruct(dr.distribute(ops, ctx), ys, None, n_iter=2, **kw)
        assert Checkpoint(kw["checkpoint"]).open_array("r", "sensitivity_0").shape == (2, 1, 1, 10, 24, 24)
        with pytest.raises(CheckpointMismatchError, match="reduced_state"):
            dr.reconstruct(dr.distribute(ops, ctx), ys, None, n_iter=3, resume=True, **kw)
