"""
Plug-and-play on an image in Zarr, out of core
===============================================

When the measurements are dask arrays (here read from Zarr) and every operator is local
(blurs, downsampling, inpainting: :mod:`daskrecon.operators.chunkwise`), ``dr.reconstruct`` streams each
iteration chunk by chunk from one Zarr slot of the checkpoint to the other: the image can
be larger than the memory of the whole cluster. A crash leaves the last committed iterate;
``resume=True`` continues from it.
"""

import atexit
import os
import shutil
import tempfile

import dask.array as da
import numpy as np
import torch
from deepinv.physics import Blur, Downsampling
from deepinv.physics.functional.blur import gaussian_blur
from skimage import data

import daskrecon as dr
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", 512))

if __name__ == "__main__":
    tmp = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the Zarr arrays are scratch: removed at exit
    img = torch.from_numpy(data.astronaut()[:SIZE, :SIZE].astype(np.float32) / 255).permute(2, 0, 1)[None]
    ops = [Blur(filter=gaussian_blur(sigma=(1.5, 1.5)), padding="reflect"),
           Downsampling(img_size=img.shape[1:], filter="gaussian", factor=2, padding="reflect")]
    g = torch.Generator().manual_seed(0)
    for i, op in enumerate(ops):  # the measurements, as they would arrive: Zarr stores
        y = op.A(img) + 0.03 * torch.randn(op.A(img).shape, generator=g)
        da.from_array(y.numpy(), chunks=(1, 3, SIZE // 4, SIZE // 4)).to_zarr(f"{tmp}/y{i}.zarr")

    with dr.DistributedContext() as ctx:
        dphys = dr.distribute(ops, ctx)
        print("every operator chunk-wise:", dphys.chunkable)
        dden = dr.distribute(bundled_denoiser(), ctx, patch_size=128, overlap=8)
        ys = [da.from_zarr(f"{tmp}/y{i}.zarr") for i in range(len(ops))]
        x, history = dr.reconstruct(dphys, ys, dden, n_iter=8, step_size=0.8, sigma_denoiser=0.03,
                                    x0=da.from_zarr(f"{tmp}/y0.zarr"), checkpoint=f"{tmp}/run", x_true=img,
                                    return_history=True)
        print(x)  # a dask array reading the last committed iterate
        for row in history[-2:]:
            print(row)
