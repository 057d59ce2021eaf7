import pytest
import torch
import deepinv as dinv
from deepinv.optim import L2
from deepinv.optim.data_fidelity import StackedPhysicsDataFidelity

import daskrecon as dr

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
