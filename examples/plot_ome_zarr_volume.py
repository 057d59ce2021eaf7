"""
An OME-Zarr volume in, an OME-Zarr pyramid out
==============================================

Microscopy facilities, napari and neuroglancer keep large images in OME-Zarr (OME-NGFF). This
example makes one: a fluorescence-like volume from the bundled 3-D generator
(:func:`daskrecon.demo.demo_volume`), blurred by a 3-D Gaussian point-spread function, with noise,
written as an OME-Zarr image with its voxel size (0.5 µm along z, 0.25 µm in-plane) — as an
acquisition pipeline would hand it over.

:func:`daskrecon.open_ome_zarr` reads it lazily in deepinv's layout ``(B, C, D, H, W)``
(axes ``c, z, y, x`` mapped, voxel size and units kept); :func:`daskrecon.reconstruct`
deconvolves it out of core (``storage="zarr"``: the volume streams between two Zarr slots, chunk
by chunk); :func:`daskrecon.write_ome_zarr` writes the result as an OME-Zarr multiscale image
with the input's axes, units and voxel size — level 0 streamed from the last checkpoint slot
and each coarser level averaged from the previous one by Dask, chunk by chunk, so no level is
ever whole in one process. Open it in napari (with the ``napari-ome-zarr`` plugin)::

    napari --plugin napari-ome-zarr deconvolved.ome.zarr

Slices of the truth, the measurement and every level of the result go to ``ome_zarr_volume.png``.
"""

import os
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

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", "128"))
CHUNK = SIZE // 2

if __name__ == "__main__":
    work = tempfile.mkdtemp(prefix="daskrecon-ome-")
    blur = dinv.physics.Blur(filter=gaussian_blur(psf_size=(7, 9, 9), sigma=(1.0, 1.5, 1.5)), padding="reflect")
    with dr.DistributedContext() as ctx, ctx.client.as_current():
        physics = dr.distribute([blur], ctx)
        # The acquisition, as an OME-Zarr image with its voxel size (never whole in memory).
        x_true = demo_volume((SIZE, SIZE, SIZE), chunks=CHUNK, seed=7)
        noise = da.random.default_rng(0).standard_normal(x_true.shape, chunks=x_true.chunks, dtype=np.float32)
        voxel = dict(voxel_size=(0.5, 0.25, 0.25), units="micrometer", levels=1, ctx=ctx)
        dr.write_ome_zarr(physics.A(x_true)[0] + 0.03 * noise, os.path.join(work, "acquired.ome.zarr"), **voxel)
        dr.write_ome_zarr(x_true, os.path.join(work, "truth.ome.zarr"), **voxel)

        acquired = dr.open_ome_zarr(os.path.join(work, "acquired.ome.zarr"))
        truth = dr.open_ome_zarr(os.path.join(work, "truth.ome.zarr")).data
        print(f"read {acquired.path}: axes {acquired.axes}, voxel size {acquired.voxel_size}, units "
              f"{acquired.units} -> deepinv layout {acquired.data.shape}")
        denoiser = dr.distribute(bundled_denoiser_3d(), ctx, patch_size=CHUNK // 2, overlap=4)
        x, history = dr.reconstruct(physics, [acquired.data], denoiser, algorithm="fista", n_iter=8,
                                    x0=acquired.data, x_true=truth, storage="zarr",
                                    checkpoint=os.path.join(work, "checkpoint"), progress=False, return_history=True)
        out = dr.write_ome_zarr(x, os.path.join(work, "deconvolved.ome.zarr"), like=acquired, levels=3, ctx=ctx)
        result = dr.open_ome_zarr(out)
        levels = [dr.open_ome_zarr(out, level=k) for k in range(result.levels)]
        mse_y = float(((acquired.data - truth) ** 2).mean().compute())
        mid = SIZE // 2
        slices = [truth[0, 0, mid].compute(), acquired.data[0, 0, mid].compute()]
        slices += [lv.data[0, 0, lv.data.shape[2] // 2].compute() for lv in levels]
    print(f"{SIZE}³ volume: measurement PSNR {psnr_of_mse(mse_y):.2f} dB, FISTA after {len(history)} iterations "
          f"{history[-1]['psnr']:.2f} dB")
    for lv in levels:
        print(f"  level {lv.level}: shape {lv.data.shape[2:]}, voxel size "
              f"{tuple(lv.voxel_size[a] for a in lv.spatial_axes)} {lv.units['x']}")
    print(f"wrote {out}; open it with: napari --plugin napari-ome-zarr {out}")

    titles = ["truth", "acquired"] + [f"result, level {lv.level}" for lv in levels]
    fig, axes = plt.subplots(1, len(slices), figsize=(3 * len(slices), 3.2))
    for ax, img, title in zip(axes, slices, titles):
        ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig("ome_zarr_volume.png", dpi=120)
    print("wrote ome_zarr_volume.png")
