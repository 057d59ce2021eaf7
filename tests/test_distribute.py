import pytest
import torch
import deepinv as dinv
from deepinv.optim import L2
from deepinv.optim.data_fidelity import StackedPhysicsDataFidelity

import daskrecon as dr
from daskrecon.frontend.framework import DistributedReplicatedParameters

from helpers import Square, blurs


def test_dispatch_by_type(ctx):
    ops = blurs(2)
    assert type(dr.distribute(dinv.physics.stack(*ops), ctx)) is dr.DistributedLinearPhysics
    assert type(dr.distribute(ops, ctx)) is dr.DistributedLinearPhysics
    assert type(dr.distribute([Square(1.0), ops[0]], ctx)) is dr.DistributedPhysics
    assert type(dr.distribute(dinv.physics.StackedPhysics([Square(1.0)]), ctx)) is dr.DistributedPhysics
    assert isinstance(dr.distribute(L2(), ctx), dr.DistributedDataFidelity)
    assert isinstance(dr.distribute([L2(), L2()], ctx), dr.DistributedDataFidelity)
    assert isinstance(dr.distribute(StackedPhysicsDataFidelity([L2(), L2()]), ctx), dr.DistributedDataFidelity)
    assert dr.DistributedStackedLinearPhysics is dr.DistributedLinearPhysics


def test_factory_detection(ctx):
    factory = lambda i, device, kw: dinv.physics.Blur(filter=torch.ones(1, 1, 3, 3) / 9 * kw["gain"], padding="circular")
    d = dr.distribute(factory, ctx, num_operators=3, factory_kwargs={"gain": 2.0})
    assert type(d) is dr.DistributedLinearPhysics and len(d) == 3
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(d.A(x)[2], factory(2, "cpu", {"gain": 2.0}).A(x))
    with pytest.raises(ValueError, match="you must provide num_operators"):
        dr.distribute(factory, ctx)
    fid = dr.distribute(lambda i, device, kw: L2(), ctx, num_operators=3)
    assert isinstance(fid, dr.DistributedDataFidelity)


def test_rejections(ctx):
    with pytest.raises(ValueError, match="cannot distribute an object of type int"):
        dr.distribute(3, ctx)
    dphys = dr.distribute(blurs(2), ctx)
    for again in (dict(), dict(type_object="linear_physics")):
        with pytest.raises(TypeError, match="DistributedLinearPhysics is distributed already"):
            dr.distribute(dphys, ctx, **again)
    with pytest.raises(TypeError, match="is distributed already"):
        dr.distribute([dphys[0].stack, blurs(1)[0]], ctx, type_object="linear_physics")
    with pytest.raises(ValueError, match="empty list"):
        dr.distribute([], ctx)
    with pytest.raises(ValueError, match="only Physics or only DataFidelity"):
        dr.distribute([L2(), blurs(1)[0]], ctx)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['shared'\\]"):
        dr.distribute(blurs(2), ctx, shared={})  # deepinv ignored this silently
    with pytest.raises(TypeError, match="do not apply to 'linear_physics'"):
        dr.distribute(blurs(2), ctx, patch_size=64)
    with pytest.raises(ValueError, match="type_object must be"):
        dr.distribute(blurs(2), ctx, type_object="operator")
    with pytest.raises(ValueError, match="gather_strategy must be one of"):
        dr.distribute(blurs(2), ctx, gather_strategy="invalid_strategy")


def test_register_user_type(ctx):
    class MyStack(list):
        pass

    dr.register(MyStack, "linear_physics")
    assert type(dr.distribute(MyStack(blurs(2)), ctx)) is dr.DistributedLinearPhysics
    with pytest.raises(ValueError, match="kind must be one of"):
        dr.register(MyStack, "weird")


def test_deepinv_05_keywords_and_kinds(ctx):
    """A deepinv 0.5 call: its shared keywords at their defaults pass, its training kinds are refused clearly."""
    from deepinv.models import DnCNN
    from deepinv.optim import PGD, PnP

    ops = blurs(2)
    d = dr.distribute(ops, ctx, num_operators=None, type_object="auto", dtype=torch.float32,
                      gather_strategy="concatenated", tiling_strategy=None, checkpoint_batches="auto",
                      checkpoint_use_reentrant=False, checkpoint_preserve_rng_state=True, reduction="sum")
    assert type(d) is dr.DistributedLinearPhysics
    den = dr.distribute(DnCNN(3, 3, depth=2, nf=4, pretrained=None), ctx, tiling_strategy=None, patch_size=16,
                        overlap=4, checkpoint_batches="never", gather_strategy="concatenated")
    assert den.checkpoint_batches == "never"
    x = torch.rand(1, 3, 40, 36)
    with torch.no_grad():
        den(x, 0.05)
    assert den.current_shape == x.shape and den.num_patches == 9 and den.local_indices == list(range(9))
    with pytest.raises(ValueError, match="checkpoint_batches must be one of"):
        dr.distribute(DnCNN(3, 3, depth=2, nf=4, pretrained=None), ctx, checkpoint_batches="sometimes")
    p = torch.nn.Parameter(torch.ones(3))
    assert dr.distribute(p, ctx) is p  # deepinv 0.5: the parameter itself, usable in Adam([p]) and arithmetic
    assert isinstance(p._deepinv_dist_sync, DistributedReplicatedParameters) and p._deepinv_dist_sync.parameters == [p]
    q = torch.nn.Parameter(torch.zeros(2))
    both = dr.distribute([p, q], ctx, type_object="parameters", average=False)
    assert isinstance(both, list) and both[0] is p and both[1] is q and not q._deepinv_dist_sync.average
    opt = torch.optim.Adam([dr.distribute(torch.nn.Parameter(torch.tensor(0.5)), ctx)], lr=0.1)
    (2 * opt.param_groups[0]["params"][0] + 1).backward()
    opt.step()
    assert float(opt.param_groups[0]["params"][0]) < 0.5
    with pytest.raises(TypeError, match="nn.Parameter"):
        dr.distribute(["a"], ctx, type_object="parameters")
    model = PGD(data_fidelity=L2(), prior=PnP(DnCNN(3, 3, depth=2, nf=4, pretrained=None)), stepsize=[0.9],
                sigma_denoiser=[0.05], max_iter=1, unfold=True)
    assert dr.distribute(model, ctx, patch_size=16, overlap=4) is model  # in place, as deepinv 0.5
    assert isinstance(model._deepinv_dist_sync, DistributedReplicatedParameters)
    assert isinstance(model.data_fidelity[0], dr.DistributedDataFidelity)
    assert isinstance(model.prior[0].denoiser, dr.DistributedProcessing)
    assert model.prior[0].denoiser.patch_size == 16
    not_unfolded = PGD(data_fidelity=L2(), prior=PnP(DnCNN(3, 3, depth=2, nf=4, pretrained=None)), stepsize=[0.9],
                       sigma_denoiser=[0.05], max_iter=1)
    with pytest.raises(TypeError, match="unfold=True"):
        dr.distribute(not_unfolded, ctx)
    # deepinv 0.5's signature and attributes: (ctx, parameters, average=True), .parameters a list
    params = [torch.nn.Parameter(torch.ones(1)), torch.ones(1)]  # a plain tensor is dropped, as deepinv does
    sync = DistributedReplicatedParameters(ctx, params)
    assert sync.parameters == [params[0]] and sync.average and sync.ctx is ctx
    sync.remove_hooks()
    with pytest.raises(TypeError, match="the context comes first"):
        DistributedReplicatedParameters(params, ctx)


def test_framework_module_has_deepinv_05_names():
    import deepinv.distributed.framework as theirs

    import daskrecon.frontend.framework as ours

    assert set(theirs.__all__) <= set(ours.__all__)
    assert ours.DistributedStackedLinearPhysics is dr.DistributedLinearPhysics
    assert ours.DistributedContext is dr.DistributedContext


def test_fidelity_public_attributes(ctx):
    shared = dr.distribute(L2(), ctx, reduction="mean")
    assert shared.reduction_mode == "mean" and isinstance(shared.single_fidelity, L2)
    assert shared.local_data_fidelities == []
    per_op = dr.distribute([L2(), L2(sigma=2.0)], ctx)
    assert per_op.single_fidelity is None and len(per_op.local_data_fidelities) == 2
