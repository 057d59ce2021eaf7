"""
A 3-D volume from Zarr, deconvolved out of core
===============================================

A synthetic fluorescence-microscopy-like volume (blobs and filaments,
:func:`daskrecon.demo.demo_volume`) is blurred by a 3-D Gaussian point-spread function with
deepinv's ``Blur`` (a ``(1, 1, 7, 9, 9)`` filter, reflect padding), Gaussian noise is added, and
the measurement is written to Zarr chunk by chunk — as a microscope's acquisition would be.
``daskrecon.reconstruct`` reads it back with ``da.from_zarr`` and deconvolves it with FISTA and
the bundled 3-D DnCNN, ``storage="zarr"``: the volume streams from one Zarr slot to the other,
the 3-D blur runs chunk by chunk (``map_overlap`` with its padding at the volume's border) and
the denoiser runs tile by tile inside each chunk. Nothing volume-sized is ever held whole, so
the same script runs on volumes many times larger than the cluster's memory (see
``benchmarks/bench_ooc_volume.py``). Mid-volume slices are plotted to ``volume_zarr.png``.
"""

import atexit
import os
import shutil
import tempfile

import dask.array as da
import deepinv as dinv
import matplotlib.pyplot as plt
import numpy as np
from deepinv.physics.functional import gaussian_blur

import daskrecon as dr
from daskrecon.demo import demo_volume
from daskrecon.engine.loop import psnr_of_mse
from daskrecon.models import bundled_denoiser_3d

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", "96"))
CHUNK = SIZE // 2

if __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="daskrecon-volume-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the Zarr arrays are scratch: removed at exit
    blur = dinv.physics.Blur(filter=gaussian_blur(psf_size=(7, 9, 9), sigma=(1.0, 1.5, 1.5)), padding="reflect")
    with dr.DistributedContext() as ctx, ctx.client.as_current():
        physics = dr.distribute([blur], ctx)
        # The acquisition: truth → blur (chunk-wise) → noise → Zarr, never whole in memory.
        x_true = demo_volume((SIZE, SIZE, SIZE), chunks=CHUNK, seed=7)
        noise = da.random.default_rng(0).standard_normal(x_true.shape, chunks=x_true.chunks, dtype=np.float32)
        (physics.A(x_true)[0] + 0.03 * noise).to_zarr(os.path.join(work, "y.zarr"))
        x_true.to_zarr(os.path.join(work, "x_true.zarr"))

        y = da.from_zarr(os.path.join(work, "y.zarr"))
        truth = da.from_zarr(os.path.join(work, "x_true.zarr"))
        denoiser = dr.distribute(bundled_denoiser_3d(), ctx, patch_size=CHUNK // 2, overlap=4)
        x, history = dr.reconstruct(physics, [y], denoiser, algorithm="fista", n_iter=10, x0=y, x_true=truth,
                                    storage="zarr", checkpoint=os.path.join(work, "checkpoint"), progress=False,
                                    return_history=True)
        x.to_zarr(os.path.join(work, "x.zarr"))
        mse_y = float(((y - truth) ** 2).mean().compute())
        mid = SIZE // 2
        slices = [a[0, 0, mid].compute() for a in (truth, y, da.from_zarr(os.path.join(work, "x.zarr")))]
    print(f"{SIZE}³ volume in {CHUNK}³ chunks: measurement PSNR {psnr_of_mse(mse_y):.2f} dB, "
          f"FISTA after {len(history)} iterations {history[-1]['psnr']:.2f} dB (best {max(h['psnr'] for h in history):.2f})")
    print(f"volumes in {work} (scratch: removed when the script ends)")

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, img, title in zip(axes, slices, ("truth", "blurred + noise", "FISTA + 3-D DnCNN")):
        ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{title} (slice {mid})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig("volume_zarr.png", dpi=120)
    print("wrote volume_zarr.png")
