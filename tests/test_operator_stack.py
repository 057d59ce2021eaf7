"""OperatorStack: operators on their workers, one task each, results in operator order or summed along the tree."""

import deepinv as dinv
import pytest
import torch
from helpers import Square, blurs

from daskrecon.errors import LinearityError
from daskrecon.frontend.operator_stack import OperatorStack
from daskrecon.runtime.arrays import as_numpy, place
from daskrecon.tasks import operators as operator_tasks

H, W = 29, 23


def _stack(ctx, sources, fast=False):
    return OperatorStack(ctx, sources, factory_kwargs=None, fast=fast)


def test_results_come_back_in_operator_order_and_sum_along_the_tree(ctx):
    ops = blurs(5)
    stack = _stack(ctx, ops)
    x = torch.randn(1, 3, H, W)
    xf = place(ctx.client, as_numpy(x, "x"))
    submit = lambda: stack.submit(operator_tasks.forward_op, xf, {}, None, False)
    each = stack.finish(submit(), True, None, "A")
    assert len(each) == 5
    for i, op in enumerate(ops):  # each entry is its own operator's, not a neighbour's
        assert torch.allclose(each[i], op.A(x), atol=1e-6)
        assert not torch.allclose(each[i], ops[(i + 1) % 5].A(x), atol=1e-3)
    total = stack.finish(submit(), True, "sum", "A")
    assert torch.allclose(total, sum(op.A(x) for op in ops), atol=1e-5)
    assert torch.equal(stack.finish(submit(), True, "mean", "A"), total / 5)
    assert isinstance(stack.finish(submit(), False, None, "A"), list)
    with pytest.raises(ValueError, match="reduce_op"):
        stack.finish(submit(), True, "max", "A")
    assert set(stack.owners) == set(ctx.workers())  # spread over both workers


def test_a_factory_stack_learns_linearity_on_the_workers_and_builds_nothing_here(ctx):
    stack = _stack(ctx, [lambda i, device, kw: [*blurs(2), Square(1.0)][i]] * 3)
    assert stack.linear == [True, True, False] and not stack.built_on_driver
    assert [d["type"] for d in stack.map(operator_tasks.describe)] == ["Blur", "Blur", "Square"]
    assert [type(p).__name__ for p in stack.driver_copies()] == ["Blur", "Blur", "Square"] and stack.built_on_driver


def test_a_non_linear_operator_is_named_when_a_linear_method_is_asked(ctx):
    stack = _stack(ctx, [blurs(1)[0], Square(2.0)])
    assert stack.linear == [True, False]
    with pytest.raises(LinearityError, match=r"my_method needs linear operators, but operators \[1\]"):
        stack.require_linear("my_method")


def test_noise_seeds_come_from_the_drivers_rng(ctx):
    stack = _stack(ctx, blurs(3))
    torch.manual_seed(7)
    a = stack.seeds()
    torch.manual_seed(7)
    assert stack.seeds() == a and a == [a[0], a[0] + 1, a[0] + 2]
    assert stack.seeds() != a


def test_chunkwise_forms_and_fingerprint_follow_the_operators(ctx):
    ops = blurs(2) + [dinv.physics.Tomography(angles=8, img_width=16)]
    stack = _stack(ctx, ops)
    forms = stack.chunkwise_forms()
    assert [f is not None for f in forms] == [True, True, False]
    assert stack.chunkwise_forms() is forms  # computed once
    assert _stack(ctx, blurs(2)).fingerprint() == _stack(ctx, blurs(2)).fingerprint()
    assert _stack(ctx, blurs(2)).fingerprint() != _stack(ctx, blurs(3)[1:]).fingerprint()
    assert _stack(ctx, blurs(2)).fingerprint() != _stack(ctx, blurs(2), fast=True).fingerprint()
