"""The training benchmark problem: an unrolled PGD (deepinv, unfold=True) with a DnCNN prior, 3 blurs + noise."""

import torch


def problem(size: int, depth: int = 20, nf: int = 64, unroll: int = 3):
    """``(ops, y, x_true, build)``: ``build()`` makes the same freshly initialised model every time."""
    from deepinv.models import DnCNN
    from deepinv.optim import PGD, PnP
    from deepinv.optim.data_fidelity import L2

    from _pnp_problem import problem as pnp_problem

    ops, y, _, x_true = pnp_problem(size)  # the PnP benchmark's blurs, noise and image

    def build():
        torch.manual_seed(0)
        net = DnCNN(3, 3, depth=depth, nf=nf, pretrained=None).eval()
        return PGD(data_fidelity=L2(), prior=PnP(net), stepsize=[0.3] * unroll, sigma_denoiser=[0.05] * unroll,
                   max_iter=unroll, unfold=True, trainable_params=["stepsize"])

    return ops, y, x_true, build


def add_arguments(parser) -> None:
    """The workload's options, shared by the benchmark and its deepinv.distributed side."""
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--nf", type=int, default=64)
    parser.add_argument("--unroll", type=int, default=3)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)


def train_step(model, optimizer, y, physics, x_true) -> float:
    """One supervised step: forward through the unrolled model, MSE, backward, optimizer step."""
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(y, physics), x_true)
    loss.backward()
    optimizer.step()
    return loss.item()
