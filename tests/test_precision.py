"""Mixed precision with a measured error budget: planning.precision (the choice), tasks.precision (autocast
and the probe), frontend.tile_precision (probed once, kept), and what reconstruct, training and the config do with it."""

import math
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import daskrecon as dr
from daskrecon.engine.checkpoint import CheckpointMismatchError
from daskrecon.errors import PrecisionError
from daskrecon.planning.precision import DEFAULT_TOL, REDUCED, check_precision, choose
from daskrecon.tasks.precision import supported

from helpers import blurs, noisy_measurements, small_dncnn

BF16 = "bf16" in supported(torch.device("cpu"))
needs_bf16 = pytest.mark.skipif(not BF16, reason="this CPU has no bf16 units (AVX-512-bf16/AMX): bf16 is refused here")


def _report(**errors):
    out = {"fp32": {"seconds": 1.0, "max_error": 0.0, "rel_error": 0.0}}
    for p, e in errors.items():
        out[p] = {"seconds": 0.25, "max_error": 4 * e, "rel_error": e}
    return out


# ---------------------------------------------------------------- the choice (pure)
def test_an_asked_precision_is_kept_within_budget_and_refused_over_it():
    assert choose("fp32", {}, 0.02)[0] == "fp32"  # never probed
    assert choose("bf16", _report(bf16=0.01), 0.02)[0] == "bf16"
    with pytest.raises(PrecisionError, match=r"relative L2 error 0.03 .* exceeds precision_tol=0.02"):
        choose("bf16", _report(bf16=0.03), 0.02)
    with pytest.raises(PrecisionError, match="cannot run it"):
        choose("fp16", _report(bf16=0.01), 0.02)
    with pytest.raises(PrecisionError):
        choose("bf16", _report(bf16=float("nan")), 0.02)  # a NaN error is not within any budget


def test_auto_takes_the_first_reduced_precision_within_budget_else_fp32():
    assert choose("auto", _report(bf16=0.01, fp16=0.001), 0.02)[0] == "bf16"
    assert choose("auto", _report(bf16=0.05, fp16=0.001), 0.02)[0] == "fp16"
    p, why = choose("auto", _report(bf16=0.05), 0.02)
    assert p == "fp32" and "over precision_tol=0.02: bf16 0.05" in why
    p, why = choose("auto", _report(), 0.02)
    assert p == "fp32" and "no reduced precision" in why


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(REDUCED), st.one_of(st.floats(0, 1), st.just(float("nan"))), max_size=2),
       st.floats(1e-6, 1.0), st.sampled_from(["fp32", "bf16", "fp16", "auto"]))
def test_the_chosen_precision_is_always_within_budget(errors, tol, requested):
    report = _report(**errors)
    try:
        p, _ = choose(requested, report, tol)
    except PrecisionError:
        assert requested in REDUCED and not (requested in errors and errors[requested] <= tol)
        return
    assert p == "fp32" or report[p]["rel_error"] <= tol
    assert requested == "auto" or p == requested


def test_bad_precisions_and_tolerances_are_refused():
    assert check_precision("bf16") == ("bf16", DEFAULT_TOL)
    for bad in ("float16", "BF16", None):
        with pytest.raises(ValueError, match="precision must be one of"):
            check_precision(bad)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="precision_tol must be a positive number"):
            check_precision("auto", bad)


# ---------------------------------------------------------------- the denoiser
@needs_bf16
def test_the_denoiser_in_bf16_is_within_its_budget_and_fp32_is_untouched(ctx):
    model = small_dncnn(3)
    x = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        d32 = dr.distribute(model, ctx, patch_size=32, overlap=8)
        d32x = dr.distribute(model, ctx, patch_size=32, overlap=8, precision="fp32")
        d16 = dr.distribute(model, ctx, patch_size=32, overlap=8, precision="bf16")
        a, b = d32(x, 0.05), d16(x, 0.05)
        assert torch.equal(a, d32x(x, 0.05)) and d32.precision_report is None  # fp32: no probe, same bits
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel <= DEFAULT_TOL, rel  # really bf16, and within budget
        report = d16.precision_report
        assert report["precision"] == "bf16" and set(report["probe"]) == {"fp32", "bf16"}
        assert 0 < report["probe"]["bf16"]["rel_error"] <= DEFAULT_TOL
        with ctx.client.as_current():
            lazy = d16(da.from_array(x.numpy(), chunks=(1, 3, 32, 48))).compute()
        assert float(np.linalg.norm(lazy - a.numpy()) / np.linalg.norm(a.numpy())) <= DEFAULT_TOL
        assert not np.array_equal(lazy, a.numpy())
        with pytest.raises(PrecisionError, match="exceeds precision_tol=1e-07"):
            dr.distribute(model, ctx, patch_size=32, overlap=8, precision="bf16", precision_tol=1e-7)(x, 0.05)
    with pytest.raises(ValueError, match="precision must be one of"):
        dr.distribute(model, ctx, precision="half")


# ---------------------------------------------------------------- reconstruct
@pytest.fixture(scope="module")
def pnp_problem():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    ops = blurs(3)
    return x, ops, noisy_measurements(ops, x, sigma=0.02)


@needs_bf16
def test_reconstruct_in_bf16_is_bitwise_on_1_2_3_workers_and_resumes_bitwise(ctx1, ctx, ctx3, pnp_problem, tmp_path):
    x, ops, y = pnp_problem
    kw = dict(n_iter=4, step_size=0.5, progress=False, return_history=True, x_true=x, precision="bf16")
    outs = []
    for c in (ctx1, ctx, ctx3):
        den = dr.distribute(small_dncnn(3), c, patch_size=32, overlap=8)
        outs.append(dr.reconstruct(dr.distribute(ops, c), y, den, **kw))
    (o1, h1), (o2, h2), (o3, h3) = outs
    assert torch.equal(o1, o2) and torch.equal(o2, o3)
    assert all(r["precision"] == "bf16" and 0 < r["precision_rel_error"] <= DEFAULT_TOL for r in h2)
    den = dr.distribute(small_dncnn(3), ctx, patch_size=32, overlap=8)
    dphys = dr.distribute(ops, ctx)
    ref = dr.reconstruct(dphys, y, den, n_iter=4, step_size=0.5, progress=False, x_true=x)
    # four iterations of a random-weight network's 0.5 % per pass: close to fp32, not equal
    assert 0 < float((ref - o2).norm() / ref.norm()) <= 5e-2
    assert abs(h2[-1]["psnr"] - dr.reconstruct(dphys, y, den, n_iter=4, step_size=0.5, progress=False, x_true=x,
                                               return_history=True)[1][-1]["psnr"]) < 0.1

    def crash(k, _):
        if k == 2:
            raise KeyboardInterrupt("simulated crash after iteration 2")

    ck = str(tmp_path / "ck")
    with pytest.raises(KeyboardInterrupt):
        dr.reconstruct(dphys, y, den, checkpoint=ck, callback=crash, **kw)
    with pytest.raises(CheckpointMismatchError, match="precision"):  # made in bf16: not resumed in fp32
        dr.reconstruct(dphys, y, den, checkpoint=ck, resume=True, **{**kw, "precision": "fp32"})
    resumed, hist = dr.reconstruct(dphys, y, den, checkpoint=ck, resume=True, **kw)
    assert torch.equal(resumed, o2) and hist == h2


@needs_bf16
def test_a_precision_over_budget_is_refused_before_any_write_or_falls_back_with_auto(ctx, pnp_problem, tmp_path):
    x, ops, y = pnp_problem
    den = dr.distribute(small_dncnn(3), ctx, patch_size=32, overlap=8)
    dphys = dr.distribute(ops, ctx)
    kw = dict(n_iter=2, step_size=0.5, progress=False, return_history=True)
    with pytest.raises(PrecisionError, match="exceeds precision_tol=1e-06"):
        dr.reconstruct(dphys, y, den, precision="bf16", precision_tol=1e-6, checkpoint=str(tmp_path / "ck"), **kw)
    assert not (tmp_path / "ck").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto, hist = dr.reconstruct(dphys, y, den, precision="auto", precision_tol=1e-6, **kw)
    assert any("auto fell back to fp32" in str(w.message) for w in caught)
    assert torch.equal(auto, dr.reconstruct(dphys, y, den, **kw)[0]) and "precision" not in hist[0]
    assert den.precision == "fp32" and den.precision_report is None  # a run's override does not stick
    auto, hist = dr.reconstruct(dphys, y, den, precision="auto", **kw)
    assert hist[0]["precision"] == "bf16"


# ---------------------------------------------------------------- training
@needs_bf16
def test_training_gradients_in_bf16_are_bitwise_on_1_and_3_workers_and_near_fp32(ctx1, ctx3):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 48, 40)
    grads = {}
    for name, c, precision in (("1", ctx1, "bf16"), ("3", ctx3, "bf16"), ("fp32", ctx3, "fp32")):
        model = small_dncnn(3).train()
        den = dr.distribute(model, c, patch_size=16, overlap=6, precision=precision)
        loss = ((den(x, 0.05) - x) ** 2).mean()
        grads[name] = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads["1"], grads["3"]))
    num = math.sqrt(sum(float((a - b).norm()) ** 2 for a, b in zip(grads["3"], grads["fp32"])))
    den_ = math.sqrt(sum(float(b.norm()) ** 2 for b in grads["fp32"]))
    assert 0 < num / den_ <= 5e-2, num / den_  # fp32 master weights, bf16 arithmetic: close, not equal


# ---------------------------------------------------------------- the config
def test_the_config_checks_the_precision_before_any_work(tmp_path):
    from daskrecon.config import ConfigError, load_config

    (tmp_path / "y.npy").write_bytes(b"")
    base = ('[input]\nmeasurements = ["y.npy"]\n[[operators]]\ntype = "blur"\nsigma = [1.0, 1.0]\n'
            '[denoiser]\n{}\n[output]\npath = "r.zarr"\n')
    (tmp_path / "bad.toml").write_text(base.format('precision = "half"'))
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "tol.toml").write_text(base.format('precision = "bf16"\nprecision_tol = -1'))
    with pytest.raises(ConfigError, match="precision_tol must be a positive number"):
        load_config(tmp_path / "tol.toml")
    (tmp_path / "ok.toml").write_text(base.format('precision = "auto"\nprecision_tol = 0.05'))
    assert load_config(tmp_path / "ok.toml")["denoiser"]["precision"] == "auto"


# ---------------------------------------------------------------- the bundled denoisers
@needs_bf16
@pytest.mark.parametrize("which", ["2d", "3d"])
def test_the_bundled_denoisers_keep_their_psnr_in_bf16(which):
    from daskrecon.demo import demo_image, demo_volume
    from daskrecon.models import bundled_denoiser, bundled_denoiser_3d

    clean = demo_image(256) if which == "2d" else torch.from_numpy(demo_volume((32, 32, 32), chunks=32).compute())
    model = bundled_denoiser() if which == "2d" else bundled_denoiser_3d()
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(noisy, 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = model(noisy, 0.1).float()

    def psnr(u):
        return float(10 * torch.log10(1 / ((u.clamp(0, 1) - clean) ** 2).mean()))

    assert psnr(a) > psnr(noisy) + 3  # the denoiser denoises...
    assert abs(psnr(b) - psnr(a)) < 0.1, (psnr(a), psnr(b))  # ...as well in bf16
    assert 0 < float((a - b).norm() / a.norm()) <= DEFAULT_TOL


def _fp16_call(cotangent_scale):
    """A conv under fp16 autocast, its loss weighted so that the scaled backward can overflow fp16."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = conv(x)
    loss = (out.float() * cotangent_scale).sum()
    return loss, [x, conv.weight, torch.zeros(1, requires_grad=True)]  # the last one unused


def test_the_fp16_loss_scale_backs_off_instead_of_failing():
    from daskrecon.tasks.denoising import FP16_LOSS_SCALE, scaled_grads

    loss, wrt = _fp16_call(1e3)
    fixed = torch.autograd.grad(loss * FP16_LOSS_SCALE, wrt[:2], retain_graph=True)
    assert not all(bool(torch.isfinite(g).all()) for g in fixed)  # the fixed scale overflows here
    got = scaled_grads(loss, wrt, FP16_LOSS_SCALE)
    ref = torch.autograd.grad(loss, wrt[:2])  # unscaled: fp16 holds these gradients
    assert got[2] is None
    for g, r in zip(got[:2], ref):
        assert torch.isfinite(g).all() and torch.allclose(g, r, rtol=1e-3, atol=1e-3)
    small, wrt = _fp16_call(1e-3)  # no overflow: the full scale, exact after unscaling by a power of two
    g_small = scaled_grads(small, wrt, FP16_LOSS_SCALE)
    assert all(torch.isfinite(g).all() for g in g_small[:2]) and g_small[1].abs().max() > 0


def test_an_fp16_backward_that_overflows_unscaled_raises():
    from daskrecon.tasks.denoising import scaled_grads

    loss, wrt = _fp16_call(1e30)
    with pytest.raises(FloatingPointError, match="overflows even with no loss scale"):
        scaled_grads(loss, wrt, 4.0)
    loss, wrt = _fp16_call(1.0)
    assert scaled_grads(loss, wrt, 1.0)[2] is None  # fp32 path: one plain backward
