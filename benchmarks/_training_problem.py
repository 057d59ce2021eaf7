"""The training benchmark problem: an unrolled PGD (deepinv, unfold=True) with a DnCNN prior, 3 blurs + noise."""

import torch


def problem(size: int, depth: int = 20, nf: int = 64, unroll: int = 3):
    """``(ops, y, x_true, build)``: ``build()`` makes the same freshly initialised model every time."""
    import deepinv as dinv
    from deepinv.models import DnCNN
    from deepinv.optim import PGD, PnP
    from deepinv.optim.data_fidelity import L2
    from deepinv.physics.functional.blur import gaussian_blur

    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(1, 3, size, size, generator=g)
    ops = []
    for i, (s, a) in enumerate([((1.0, 1.0), 0.0), ((2.0, 2.0), 0.0), ((1.5, 3.0), 30.0)]):
        op = dinv.physics.Blur(filter=gaussian_blur(sigma=s, angle=a), padding="circular")
        op.noise_model = dinv.physics.GaussianNoise(sigma=0.03, rng=torch.Generator().manual_seed(i))
        ops.append(op)
    with torch.no_grad():
        y = dinv.utils.TensorList([op(x_true) for op in ops])

    def build():
        torch.manual_seed(0)
        net = DnCNN(3, 3, depth=depth, nf=nf, pretrained=None).eval()
        return PGD(data_fidelity=L2(), prior=PnP(net), stepsize=[0.3] * unroll, sigma_denoiser=[0.05] * unroll,
                   max_iter=unroll, unfold=True, trainable_params=["stepsize"])

    return ops, y, x_true, build


def train_step(model, optimizer, y, physics, x_true) -> float:
    """One supervised step: forward through the unrolled model, MSE, backward, optimizer step."""
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss(model(y, physics), x_true)
    loss.backward()
    optimizer.step()
    return loss.item()
