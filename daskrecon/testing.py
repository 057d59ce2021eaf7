"""Contract checks for distributed objects, usable in users' own test suites.

``assert_matches_serial`` compares a distributed operator with deepinv's plain
object on the same inputs; ``assert_adjoint`` checks ``<A x, y> = <x, Aᵀ y>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from deepinv.utils import TensorList

from daskrecon.runtime.arrays import entries

__all__ = ["assert_adjoint", "assert_allclose", "assert_matches_serial", "inner"]


def assert_allclose(actual: Any, expected: Any, atol: float = 1e-5, rtol: float = 0.0, what: str = "") -> None:
    """``torch.testing.assert_close`` over tensors or TensorLists, naming the entry that differs."""
    a, e = entries(actual), entries(expected)
    assert len(a) == len(e), f"{what}: {len(a)} entries, expected {len(e)}"
    for i, (ai, ei) in enumerate(zip(a, e)):
        assert tuple(ai.shape) == tuple(ei.shape), f"{what}[{i}]: shape {tuple(ai.shape)} != {tuple(ei.shape)}"
        torch.testing.assert_close(ai.cpu(), ei.cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}[{i}]: {m}")


def inner(a: Any, b: Any) -> torch.Tensor:
    """Real inner product summed over every entry of tensors or TensorLists."""
    return sum((ai.conj() * bi).real.sum() for ai, bi in zip(entries(a), entries(b)))


def assert_adjoint(physics: Any, x: torch.Tensor, y: Any, rtol: float = 1e-4) -> None:
    """Check ``<A x, y> = <x, Aᵀ y>`` to relative tolerance ``rtol``."""
    lhs, rhs = inner(physics.A(x), y), inner(x, physics.A_adjoint(y))
    assert abs(lhs - rhs) <= rtol * max(abs(lhs), abs(rhs), 1e-12), f"<Ax,y>={lhs} but <x,A^T y>={rhs}"


def assert_matches_serial(
    distributed: Any,
    serial: Any,
    x: torch.Tensor,
    y: Sequence[torch.Tensor] | TensorList,
    methods: Sequence[str] = ("A", "A_adjoint", "A_adjoint_A", "A_A_adjoint"),
    atol: float = 1e-5,
) -> None:
    """Compare a distributed physics with deepinv's serial stack, method by method.

    ``y`` should not equal ``serial.A(x)`` so that residual-dependent paths are
    exercised at a non-zero value.
    """
    calls = {
        "A": lambda p: p.A(x),
        "A_adjoint": lambda p: p.A_adjoint(y),
        "A_adjoint_A": lambda p: p.A_adjoint_A(x),
        "A_A_adjoint": lambda p: p.A_A_adjoint(y),
        "A_vjp": lambda p: p.A_vjp(x, y),
    }
    for m in methods:
        assert_allclose(calls[m](distributed), calls[m](serial), atol=atol, what=m)
