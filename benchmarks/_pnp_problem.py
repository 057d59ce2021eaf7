"""The PnP benchmark problem: 3 circular blurs + noise on a 1x3xSxS image, DnCNN (random weights)."""

import torch


def problem(size: int):
    import deepinv as dinv
    from deepinv.models import DnCNN
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
    torch.manual_seed(0)
    return ops, y, DnCNN(3, 3, pretrained=None).eval(), x_true
