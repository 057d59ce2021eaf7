"""xarray in, xarray out: ``DataArray`` inputs keep their dims, coordinates and attributes.

daskrecon computes on positional arrays in deepinv's layout (``(B, C, H, W)`` or
``(B, C, D, H, W)``); a ``DataArray`` (numpy- or dask-backed) given to :func:`daskrecon.reconstruct`
or to a distributed denoiser is taken by position — its dims may have any names — and the
result comes back as a ``DataArray`` with the template's dims, attributes and every coordinate
whose axis kept its size (a coordinate along an axis the operator resized is dropped: it would
describe other pixels). numpy-backed in → numpy-backed out; dask-backed in → lazy out.

xarray is optional (``pip install daskrecon[xarray]``); nothing here imports it unless a
``DataArray`` is given.
"""

from __future__ import annotations

import sys
from typing import Any

import dask.array as da
import numpy as np
import torch

__all__ = ["is_dataarray", "unwrap", "wrap"]


def is_dataarray(v: Any) -> bool:
    """Whether ``v`` is an ``xarray.DataArray`` (without importing xarray when it is not loaded)."""
    xr = sys.modules.get("xarray")
    return xr is not None and isinstance(v, xr.DataArray)


def unwrap(v: Any, name: str) -> Any:
    """The array a ``DataArray`` holds: a dask array when dask-backed, else a tensor; anything else as it is."""
    if not is_dataarray(v):
        return v
    if v.ndim not in (4, 5):
        # Fewer axes is the common case (a microscope's (y, x) image): adding axes, not transposing, fits it.
        fix = {2: f"add the batch and channel axes: {name}.expand_dims(('b', 'c')) for (y, x)",
               3: f"add the axes it lacks: {name}.expand_dims('b') for (c, y, x), "
                  f"{name}.expand_dims(('b', 'c')) for a volume (z, y, x)"}.get(
            v.ndim, "transpose or reshape it (DataArray.transpose) to that layout")
        raise ValueError(f"{name} is a DataArray with dims {v.dims}: daskrecon takes (B, C, H, W) or (B, C, D, H, W) "
                         f"data, by position; {fix} (the result keeps them; .squeeze() drops them)")
    data = v.data
    if isinstance(data, da.Array):
        return data
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data)))


def wrap(result: Any, template: Any) -> Any:
    """``result`` (tensor or dask array) as a ``DataArray`` shaped like ``template``'s dims (see the module)."""
    import xarray as xr

    data = result
    if isinstance(result, torch.Tensor):
        data = result.detach().cpu().numpy()
    if data.ndim != template.ndim:
        raise ValueError(f"the result has {data.ndim} axes, the DataArray template {template.ndim}")
    coords = {}
    for k, c in template.coords.items():
        if all(data.shape[template.dims.index(d)] == template.sizes[d] for d in c.dims):
            coords[k] = c
    return xr.DataArray(data, dims=template.dims, coords=coords, attrs=dict(template.attrs), name=template.name)
