"""Faster equivalents of deepinv operators, substituted on the workers.

A worker builds each operator once; if a faster evaluation of the *same* linear map is
known, it is used there instead (``distribute(..., fast_operators=False)`` turns this
off). Today: a circular convolution (``Blur(padding="circular")``, with or without
``use_fft``) becomes :class:`FFTConvolution`, whose transfer function is computed once
per image shape from the operator's own impulse response and then reused, so a pass
costs one real FFT pair instead of a spatial convolution with a kernel of up to 29×29.

Where substitutes run. A substitute is as accurate as deepinv's own computation — here more:
on a 512² image with a 25×25 kernel, deepinv's float32 spatial convolution is 1.25e-6 from the
exact result (the same convolution in float64), the float32 FFT 3.98e-7
(``tests/test_substitutes.py``). But two float32 computations of one map differ by their
roundings, and deepinv's demo ``demo_physics_distributed.py`` checks ``A``, ``A_adjoint``
and ``A_adjoint_A`` against the plain stack at ``max_diff < 1e-6``, below deepinv's own
rounding. So the operator methods of :class:`~daskrecon.frontend.physics.DistributedPhysics`
(``A``, ``forward``, ``A_adjoint``, ``A_adjoint_A``, ``A_vjp``, ``A_dagger``,
``compute_sqnorm``) run each operator as built (:func:`original`): bit for bit deepinv's
computation. Substitutes run where results are sums over operators and iterations, whose
own rounding is larger (16 blurs: 6.4e-6 between two summation orders of deepinv's own
gradient): data-fidelity values and gradients, the normal operator, the reconstruction
engine.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from deepinv.physics import Blur, LinearPhysics

__all__ = ["FFTConvolution", "original", "specialize"]


class FFTConvolution(LinearPhysics):
    """A 2-D circular convolution ``A`` evaluated as ``irfft2(K · rfft2(x))``.

    ``K`` is the 2-D real FFT of ``A`` applied to a unit impulse at the origin, per
    channel; it is computed from the wrapped operator itself (so it is its exact
    transfer function) and cached per (channels, height, width, dtype, device).

    Parameters
    ----------
    op : deepinv.physics.LinearPhysics
        A shift-invariant operator with circular boundary and no channel mixing.
        Inputs that are not ``(B, C, H, W)`` are passed to ``op`` unchanged.
    """

    def __init__(self, op: LinearPhysics) -> None:
        device = next(iter(op.buffers()), torch.empty(0)).device
        super().__init__(noise_model=op.noise_model, sensor_model=op.sensor_model)
        self.op = op
        self.to(device)  # LinearPhysics.__init__ moved the shared noise model to the cpu
        self._transfer: dict[tuple, torch.Tensor] = {}

    def _k(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        k = self._transfer.get(key)
        if k is None:
            impulse = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
            impulse[..., 0, 0] = 1
            with torch.no_grad():
                k = torch.fft.rfft2(self.op.A(impulse))
            self._transfer[key] = k
        return k

    def _convolve(self, x: torch.Tensor, conj: bool) -> torch.Tensor:
        k = self._k(x)
        spectrum = torch.fft.rfft2(x) * (k.conj() if conj else k)
        return torch.fft.irfft2(spectrum, s=x.shape[-2:])

    def A(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.dim() != 4 or kwargs:
            return self.op.A(x, **kwargs)
        return self._convolve(x, conj=False)

    def A_adjoint(self, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if y.dim() != 4 or kwargs:
            return self.op.A_adjoint(y, **kwargs)
        return self._convolve(y, conj=True)

    def A_adjoint_A(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.dim() != 4 or kwargs:
            return self.op.A_adjoint_A(x, **kwargs)
        k = self._k(x)
        return torch.fft.irfft2(torch.fft.rfft2(x) * (k.real**2 + k.imag**2), s=x.shape[-2:])

    def A_dagger(self, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.op.A_dagger(y, **kwargs)

    @property
    def original(self) -> LinearPhysics:
        """The operator this substitutes (deepinv's own computation)."""
        return self.op


def original(op: Any) -> Any:
    """The operator as the user built it: a substitute's original, anything else itself."""
    return op.original if isinstance(op, FFTConvolution) else op


@functools.singledispatch
def specialize(op: Any) -> Any:
    """Return a faster equivalent of ``op`` when one is known, else ``op`` itself."""
    return op


@specialize.register
def _(op: Blur) -> Any:
    f = op.filter
    if op.padding == "circular" and f is not None and f.dim() == 4 and f.shape[0] == 1 and not f.is_complex():
        return FFTConvolution(op)
    return op
