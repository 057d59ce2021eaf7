"""
Training an unrolled network through the distributed operators
===============================================================

deepinv's unfolded proximal gradient (``PGD(..., unfold=True)``: three iterations, a step size
and a denoiser per iteration to learn) trained end to end with daskrecon's physics, data fidelity
and tiled denoiser — deepinv 0.5's ``distribute(model, ctx)`` of an unfolded algorithm. Every
forward pass runs on the workers as usual; every backward pass too: the data term's
Hessian-vector products per operator next to their operators, the denoiser's backward tile batch
by tile batch (recomputed there, never gathered), parameter gradients summed along a fixed tree.

Data: crops of scikit-image's bundled photographs, each seen through two blurs with noise; the
held-out images are other photographs. The denoiser starts from the bundled DnCNN. The loss curve
and the held-out PSNR before and after training go to ``unrolled_training.png``.
"""

import os

import deepinv as dinv
import matplotlib.pyplot as plt
import numpy as np
import torch
from deepinv.optim import PGD, PnP
from deepinv.optim.data_fidelity import L2
from deepinv.physics.functional.blur import gaussian_blur
from skimage import data as skdata

import daskrecon as dr
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", "96"))  # crop side
EPOCHS = 4 if SIZE <= 64 else 8
TRAIN, HELD_OUT = ("astronaut", "coffee", "rocket", "immunohistochemistry"), ("chelsea", "hubble_deep_field")


def crops(names, size, per_image, seed):
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        img = getattr(skdata, name)()
        img = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float() / 255
        for _ in range(per_image):
            i, j = rng.integers(0, img.shape[1] - size), rng.integers(0, img.shape[2] - size)
            out.append(img[None, :, i:i + size, j:j + size])
    return out


def operators():
    ops = []
    for k, (sigma, noise) in enumerate((((2.0, 2.0), 0.03), ((3.0, 1.5), 0.05))):
        op = dinv.physics.Blur(filter=gaussian_blur(sigma=sigma), padding="circular")
        op.noise_model = dinv.physics.GaussianNoise(sigma=noise, rng=torch.Generator().manual_seed(k))
        ops.append(op)
    return ops


def measure(ops, x):
    with torch.no_grad():
        return dinv.utils.TensorList([op(x) for op in ops])


def psnr(a, b):
    return float(10 * torch.log10(1 / ((a.clamp(0, 1) - b) ** 2).mean()))


if __name__ == "__main__":
    torch.manual_seed(0)
    train, held = crops(TRAIN, SIZE, 2, seed=0), crops(HELD_OUT, SIZE, 2, seed=1)
    ops = operators()
    train_y, held_y = [measure(ops, x) for x in train], [measure(ops, x) for x in held]

    model = PGD(data_fidelity=L2(), prior=PnP(bundled_denoiser()), stepsize=[0.3] * 3, sigma_denoiser=[0.05] * 3,
                max_iter=3, unfold=True, trainable_params=["stepsize"])
    with dr.DistributedContext() as ctx:
        dr.distribute(model, ctx, patch_size=SIZE // 2, overlap=12)  # in place, as deepinv 0.5
        physics = dr.distribute(ops, ctx)

        def evaluate():
            with torch.no_grad():
                return float(np.mean([psnr(model(y, physics), x) for x, y in zip(held, held_y)]))

        before = evaluate()
        steps = list(model.params_algo["stepsize"])
        weights = [p for p in model.parameters() if p.requires_grad and all(p is not s for s in steps)]
        optimizer = torch.optim.Adam([{"params": steps, "lr": 2e-2}, {"params": weights, "lr": 1e-4}])
        losses = []
        for epoch in range(EPOCHS):
            for x, y in zip(train, train_y):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(y, physics), x)
                loss.backward()  # backward passes on the workers
                optimizer.step()  # the new weights reach each worker once
                losses.append(loss.item())
            print(f"epoch {epoch + 1}: mean training loss {np.mean(losses[-len(train):]):.5f}")
        after = evaluate()
    steps = [s.item() for s in model.params_algo["stepsize"]]
    print(f"held-out PSNR: {before:.2f} dB before training, {after:.2f} dB after ({after - before:+.2f} dB); "
          f"learned step sizes {np.round(steps, 3).tolist()}")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    per_epoch = np.reshape(losses, (EPOCHS, -1)).mean(axis=1)
    a1.plot(range(1, EPOCHS + 1), per_epoch, marker="o")
    a1.set_xlabel("epoch")
    a1.set_ylabel("mean training MSE")
    a1.set_yscale("log")
    a1.set_title("training loss")
    a2.bar(["before", "after"], [before, after], color=["0.6", "C0"])
    a2.set_ylim(min(before, after) - 1, max(before, after) + 0.5)
    a2.set_ylabel("held-out PSNR (dB)")
    a2.set_title(f"{len(held)} held-out crops")
    fig.tight_layout()
    fig.savefig("unrolled_training.png", dpi=120)
    print("wrote unrolled_training.png")
