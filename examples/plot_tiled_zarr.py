"""
Denoising an image stored in Zarr, chunk by chunk
=================================================

A dask array in gives a lazy dask array out: the denoiser runs through ``map_overlap`` with
the tiling done inside each chunk, so the image never has to fit in one machine's memory.
"""

import atexit
import os
import shutil
import tempfile

import dask.array as da
import numpy as np
import zarr

import daskrecon as dr
from daskrecon.models import bundled_denoiser

SIZE = int(os.environ.get("DASKRECON_EXAMPLE_SIZE", 4096))

if __name__ == "__main__":
    tmp = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the Zarr arrays are scratch: removed at exit
    src, dst = f"{tmp}/noisy.zarr", f"{tmp}/denoised.zarr"
    rng = da.random.default_rng(0)
    clean = da.ones((1, 3, SIZE, SIZE), chunks=(1, 3, SIZE // 4, SIZE // 4), dtype=np.float32) * 0.5
    with dr.DistributedContext() as ctx:
        (clean + 0.1 * rng.standard_normal(clean.shape, chunks=clean.chunks, dtype=np.float32)).to_zarr(src)
        dden = dr.distribute(bundled_denoiser(), ctx, patch_size=256, overlap=8)
        lazy = dden(da.from_zarr(src))  # nothing computed yet
        print(lazy)
        lazy.to_zarr(dst)  # computed and written chunk by chunk on the workers
    out = zarr.open_array(dst)
    print("noise std before:", float(np.std(zarr.open_array(src)[0, 0, :256, :256] - 0.5)),
          "after:", float(np.std(out[0, 0, :256, :256] - 0.5)))
