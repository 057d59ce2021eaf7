"""Gradients through the distributed operations: each forward's backward is itself distributed.

Nothing that crosses a worker carries a torch graph. Instead each distributed operation
called on a tensor that requires grad runs as a ``torch.autograd.Function``: the forward
is the operation as usual, and the backward is another distributed operation on the
same workers:

- the stack's linear maps have their adjoints as backward (``A`` ↔ ``Σ A_iᵀ``,
  ``A_adjoint_A`` and ``A_A_adjoint`` are self-adjoint); a non-linear ``A_i`` is
  differentiated by autograd on its worker (``A_vjp`` at ``x``);
- ``f(x) = Σ d_i(A_i x, y_i)`` has ``∇f`` as backward; ``∇f`` has, per operator, the
  vector-Hessian product of ``d_i(A_i ·, y_i)`` computed by autograd on the operator's
  worker, summed along the tree fixed by operator index;
- the tiled denoiser's backward runs per batch of tiles on the worker that ran its forward,
  from the activations the forward kept there or recomputed there (``checkpoint_batches``),
  never gathered; it backpropagates the cotangent of the tiles' cores: input gradients per
  window, assembled on the driver in tile order; parameter gradients summed along a fixed
  tree. With an overlap at least the receptive radius both equal the untiled network's.

Every sum has a fixed order, so gradients are bitwise the same on any number of workers.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from deepinv.utils import TensorList

from daskrecon.frontend.measurements import MeasurementList
from daskrecon.runtime.arrays import as_numpy, place

__all__ = ["DistributedReplicatedParameters", "denoiser_call", "fidelity_fn", "fidelity_grad", "needs_grad",
           "physics_call"]

_X_METHODS = ("A", "forward", "A_adjoint_A")
_Y_METHODS = ("A_adjoint", "A_A_adjoint", "A_each", "A_adjoint_A_each")


def _listed(method: str, opts: dict) -> bool:
    """Whether the method returns one tensor per operator (else one tensor)."""
    if method in ("A_A_adjoint", "A_each"):
        return True
    if method == "A_adjoint_A_each":
        return False
    return opts.get("reduce_op") is None


def needs_grad(*values: Any) -> bool:
    """Whether autograd is recording and any tensor among ``values`` (or inside a list of them) requires grad."""
    if not torch.is_grad_enabled():
        return False
    for v in values:
        items = list(v) if isinstance(v, (list, tuple, TensorList)) else [v]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in items):
            return True
    return False


def _entries(y: Any) -> list:
    if isinstance(y, TensorList):
        return [y[i] for i in range(len(y))]
    return list(y) if isinstance(y, (list, tuple)) else [y]


def _pack(outs: Sequence[torch.Tensor], listed: bool, gather: bool) -> Any:
    if not listed:
        return outs[0]
    return MeasurementList(list(outs)) if gather else list(outs)


# ---------------------------------------------------------------------------------------- physics
def _call_physics(physics: Any, method: str, opts: dict, x: torch.Tensor | None, ys: list | None) -> Any:
    if method in _X_METHODS:
        return getattr(physics, method)(x, **opts)
    if method == "A_adjoint_A_each":
        return physics.A_adjoint_A_each(ys)
    if method in _Y_METHODS:
        return getattr(physics, method)(ys, **opts)
    return physics.A_vjp(x, ys, **opts)  # "A_vjp"


class _PhysicsFunction(torch.autograd.Function):
    """One distributed physics call; its backward is the adjoint call (a VJP for non-linear ``A_i``)."""

    @staticmethod
    def forward(ctx: Any, physics: Any, method: str, opts: dict, has_x: bool, *inputs: torch.Tensor):
        x = inputs[0] if has_x else None
        ys = list(inputs[1:] if has_x else inputs) or None
        with torch.no_grad():
            out = _call_physics(physics, method, opts, x, ys)
        outs = _entries(out)
        ctx.physics, ctx.method, ctx.opts, ctx.has_x = physics, method, opts, has_x
        ctx.listed = _listed(method, opts)
        if method == "A_vjp":
            ctx.save_for_backward(*inputs)
        elif has_x:
            ctx.save_for_backward(x)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        physics, method, opts = ctx.physics, ctx.method, ctx.opts
        n = physics.num_operators
        reduce_op = opts.get("reduce_op")
        head = (None, None, None, None)
        # Not under no_grad: with create_graph=True these calls are themselves differentiable
        # (the adjoint of a linear map is linear), so second derivatives flow.
        if method in ("A", "forward"):
            (x,) = ctx.saved_tensors
            gs = list(grads) if ctx.listed else [grads[0] / n if reduce_op == "mean" else grads[0]] * n
            # the adjoint is the true one: Σ_i (∂A_i/∂x)ᵀ g_i, whatever the physics' reduction
            return head + (physics.A_vjp(x, gs, reduce_op="sum"),)
        if method == "A_adjoint_A":
            if ctx.listed:
                return head + (physics.A_adjoint_A_each(list(grads)),)
            return head + (physics.A_adjoint_A(grads[0], reduce_op=reduce_op),)
        if method == "A_A_adjoint":
            return head + tuple(_entries(physics.A_A_adjoint(list(grads))))
        if method == "A_each":  # [A_i x_i] -> [A_iᵀ g_i]
            return head + tuple(_entries(physics.A_adjoint(list(grads), reduce_op=None)))
        if method == "A_adjoint_A_each":  # Σ A_iᵀA_i x_i -> [A_iᵀA_i g]
            return head + tuple(_entries(physics.A_adjoint_A(grads[0], reduce_op=None)))
        if method == "A_vjp" and not all(physics.linear):
            # Σ_i J_i(x)ᵀ v_i: J_i g in v_i (not A_i g), and in x the second derivative, per operator
            _refuse_higher_order("A_vjp of non-linear operators (or with respect to x)")
            x, *v = ctx.saved_tensors
            g = grads[0] / n if reduce_op == "mean" else grads[0]
            with torch.no_grad():
                gx, gv = physics.vjp_backward(x, v, g, wrt_x=ctx.needs_input_grad[4])
            return head + (gx, *gv)
        # A_adjoint and A_vjp (linear): the backward of Σ_i A_iᵀ y_i is A_i g, per operator
        if ctx.listed:
            gy = _entries(physics.A_each(list(grads)))
        else:
            g = grads[0] / n if reduce_op == "mean" else grads[0]
            gy = _entries(physics.A(g, reduce_op=None))
        return head + ((None,) if ctx.has_x else ()) + tuple(gy)


def physics_call(physics: Any, method: str, *, x: torch.Tensor | None = None, ys: Any = None,
                 gather: bool = True, **opts: Any) -> Any:
    """``physics.<method>`` on tensors that require grad: the result carries a distributed backward.

    Parameters
    ----------
    physics : DistributedPhysics
    method : {"A", "forward", "A_adjoint", "A_adjoint_A", "A_A_adjoint", "A_vjp"}
    x, ys : the image and/or the per-operator tensors the method takes
    gather : bool
        ``False`` returns a list where deepinv returns a list.
    opts : the method's other options (``reduce_op``, operator keyword arguments)
    """
    ys_list = [] if ys is None else _entries(ys)
    inputs = ([x] if x is not None else []) + ys_list
    outs = _PhysicsFunction.apply(physics, method, dict(opts, gather=True), x is not None, *inputs)
    return _pack(outs, _listed(method, opts), gather)


# ---------------------------------------------------------------------------------------- fidelity
class _FidelityFunction(torch.autograd.Function):
    """``f(x)`` (``kind="fn"``, backward ``g·∇f(x)``) or ``∇f(x)`` (``kind="grad"``, backward ``∇²f(x) g``);
    in the measurements ``ys`` (the tensors of ``y``), backward the vector-Jacobian products per operator."""

    @staticmethod
    def forward(ctx: Any, kind: str, fidelity: Any, physics: Any, y: Any, kwargs: dict,
                x: torch.Tensor, *ys: torch.Tensor) -> torch.Tensor:
        ctx.kind, ctx.fidelity, ctx.physics, ctx.y, ctx.kwargs = kind, fidelity, physics, y, kwargs
        ctx.save_for_backward(x)
        with torch.no_grad():
            return getattr(fidelity, kind)(x, y, physics, **kwargs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[5]:
            if ctx.kind == "grad":
                _refuse_higher_order("the data fidelity's gradient")
                with torch.no_grad():
                    gx = ctx.fidelity.hessian_vector(x, ctx.y, ctx.physics, g, **ctx.kwargs)
            else:  # differentiable again under create_graph=True: grad is itself a distributed Function
                grad = ctx.fidelity.grad(x, ctx.y, ctx.physics, **ctx.kwargs)
                gx = grad * (g.reshape(g.shape + (1,) * (grad.dim() - g.dim())) if g.dim() else g)
        gys: list = [None] * (len(ctx.needs_input_grad) - 6)
        if any(ctx.needs_input_grad[6:]):
            _refuse_higher_order("the data fidelity with respect to the measurements y")
            with torch.no_grad():
                gys = ctx.fidelity.measurement_vjp(ctx.kind, x.detach(), ctx.y, ctx.physics, g, **ctx.kwargs)
        return (None, None, None, None, None, gx, *gys)


def _refuse_higher_order(what: str) -> None:
    """A backward that is not itself differentiable must not return gradients cut from the graph."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"second derivatives through {what} are not supported (backward with "
                                  "create_graph=True); they are through the physics and the data fidelity's value")


def measurement_tensors(y: Any) -> list:
    """The tensors of measurements ``y`` that autograd can follow (none in a ``DistributedMeasurements``)."""
    if isinstance(y, (list, tuple, TensorList, torch.Tensor)):
        return [t for t in _entries(y) if isinstance(t, torch.Tensor)]
    return []


def _detached_measurements(y: Any) -> Any:
    if isinstance(y, torch.Tensor):
        return y.detach()
    if isinstance(y, TensorList):
        return TensorList([y[i].detach() for i in range(len(y))])
    if isinstance(y, (list, tuple)):
        return type(y)(t.detach() if isinstance(t, torch.Tensor) else t for t in y)
    return y


def fidelity_fn(fidelity: Any, x: torch.Tensor, y: Any, physics: Any, **kwargs: Any) -> torch.Tensor:
    """``f(x)`` whose backward is ``∇f`` (and, in ``y``, its vector-Jacobian product) computed on the workers."""
    return _FidelityFunction.apply("fn", fidelity, physics, _detached_measurements(y), kwargs, x, *measurement_tensors(y))


def fidelity_grad(fidelity: Any, x: torch.Tensor, y: Any, physics: Any, **kwargs: Any) -> torch.Tensor:
    """``∇f(x)`` whose backward is the Hessian-vector product (and, in ``y``, the mixed product), per operator."""
    return _FidelityFunction.apply("grad", fidelity, physics, _detached_measurements(y), kwargs, x, *measurement_tensors(y))


# ---------------------------------------------------------------------------------------- denoiser
def _arg_leaves(args: tuple, kwargs: dict) -> tuple[list[tuple[str, Any]], list[torch.Tensor]]:
    """Tensor arguments that require grad (``sigma`` of an unfolded algorithm), as (place, tensor)."""
    paths, leaves = [], []
    for k, v in enumerate(args):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            paths.append(("arg", k))
            leaves.append(v)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            paths.append(("kwarg", k))
            leaves.append(v)
    return paths, leaves


def _detached(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    d = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(d(v) for v in args), {k: d(v) for k, v in kwargs.items()}


class _DenoiserFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, proc: Any, method: str, spec: dict, x: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        ctx.proc, ctx.method, ctx.spec, ctx.kept = proc, method, spec, None
        ctx.save_for_backward(x)
        strategy = proc.strategy_for(x.shape)
        nbytes = proc.activations.reserve(method, x.shape, strategy, spec["args"], spec["kwargs"],
                                          x.element_size()) if hasattr(strategy, "patch_cotangents") else 0
        keep = None
        if nbytes:
            # the graphs stay on the workers until the backward, or until this node is freed
            keep = {"id": uuid.uuid4().hex, "params": spec["params"], "paths": spec["paths"],
                    "need_x": ctx.needs_input_grad[3]}
            ctx.kept = keep["id"]
            ctx.release = weakref.finalize(ctx, proc.activations.release, keep["id"], nbytes)
        # placed once: the backward's tile batches read the same key
        ctx.x_placed = place(proc.ctx.client, as_numpy(x.detach()))
        with torch.no_grad():
            return proc.run_tensor(x.detach(), method, spec["args"], spec["kwargs"], placed=ctx.x_placed, keep=keep)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        _refuse_higher_order("the tiled denoiser")
        (x,) = ctx.saved_tensors
        spec = ctx.spec
        need_x = ctx.needs_input_grad[3]
        gx, gleaves = ctx.proc.run_backward(x.detach(), g.detach(), ctx.method, spec["args"], spec["kwargs"],
                                                spec["params"], spec["paths"], need_x, ctx.kept, ctx.x_placed)
        if ctx.kept is not None:
            ctx.release()  # graphs left by batches that ran elsewhere; a second backward recomputes
            ctx.kept = None
        return (None, None, None, gx if need_x else None) + tuple(gleaves)


def denoiser_call(proc: Any, x: torch.Tensor, method: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tiled denoiser on ``x`` with a backward run tile-batch by tile-batch on the workers.

    Gradients flow to ``x``, to the model's parameters that require grad, and to tensor
    arguments that require grad (a trainable ``sigma``).
    """
    params = proc.trainable_parameters()
    paths, arg_leaves = _arg_leaves(args, kwargs)
    args_d, kwargs_d = _detached(args, kwargs)
    spec = {"args": args_d, "kwargs": kwargs_d, "params": [name for name, _ in params], "paths": paths}
    return _DenoiserFunction.apply(proc, method, spec, x, *[p for _, p in params], *arg_leaves)


# ---------------------------------------------------------------------------------------- parameters
class DistributedReplicatedParameters:
    """deepinv 0.5's gradient synchronisation of replicated parameters, with its signature and attributes.

    Under ``torchrun`` each rank holds a replica whose gradient covers only that rank's share
    of the operators and tiles, so deepinv registers hooks that all-reduce ``p.grad`` after each
    backward (and divide by the world size with ``average``). Here the driver holds the only
    copy, and the backward of every distributed operation returns its whole contribution
    (summed along fixed trees on the workers): the gradient autograd leaves in ``p.grad`` is
    already complete, on any number of workers. No hook is registered; ``average`` has
    nothing to average (one rank).

    Parameters
    ----------
    ctx : DistributedContext
    parameters : sequence of nn.Parameter
        Entries that are not ``nn.Parameter`` are dropped, as deepinv does.
    average : bool
        deepinv's averaging over ranks (``world_size`` is 1 here).

    Attributes
    ----------
    ctx, average
    parameters : list of nn.Parameter
    """

    def __init__(self, ctx: Any, parameters: Any, average: bool = True) -> None:
        if isinstance(ctx, torch.Tensor) or (isinstance(ctx, (list, tuple)) and ctx
                                             and isinstance(ctx[0], torch.Tensor)):
            raise TypeError("DistributedReplicatedParameters takes (ctx, parameters, average=True), as deepinv 0.5: "
                            "the context comes first")
        if isinstance(parameters, torch.Tensor):
            raise TypeError("parameters must be a sequence of nn.Parameter (wrap one in a list)")
        self.ctx = ctx
        self.average = average
        self.parameters = [p for p in parameters if isinstance(p, torch.nn.Parameter)]
        self._hooks: list = []

    def remove_hooks(self) -> None:
        """deepinv's hook removal: there are none to remove (see the class)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __repr__(self) -> str:
        return f"DistributedReplicatedParameters({len(self.parameters)} parameters, average={self.average})"