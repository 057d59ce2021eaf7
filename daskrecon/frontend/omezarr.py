"""OME-Zarr (OME-NGFF) in and out: what microscopy facilities, napari and neuroglancer keep images in.

:func:`open_ome_zarr` reads one resolution level of an OME-Zarr image as a lazy dask array in
deepinv's layout (``(B, C, H, W)`` or ``(B, C, D, H, W)``) together with what the file says about it
(:class:`OMEImage`: axes, voxel size, units); :func:`write_ome_zarr` writes a signal as an
OME-Zarr multiscale image: level 0 plus a pyramid that Dask computes chunk by chunk on the
workers (no level is assembled in memory), NGFF 0.4 (Zarr v2) or 0.5 (Zarr v3).

The metadata, the pyramid and the reading are the ``ome-zarr`` library's (the one napari's
OME-Zarr reader uses), validated by ``ome-zarr-models``; what is ours is the mapping between
the file's axes and deepinv's layout, the refusal to replace what exists, the check that the
workers see where they write, and the bounded computation.

Axis mapping: the ``time`` axis is deepinv's batch ``B``, the ``channel`` axis its ``C``, the
``space`` axes (2 or 3, in the file's order) its ``[D,] H, W``; an axis the file lacks is added
with size 1 (and dropped again on writing with ``like=``). Axes of another type (e.g. an
``angle``) have no place in that layout: :class:`OMEZarrError`.

Optional dependency: ``pip install "daskrecon[ome]"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon.errors import OMEZarrError, OutputExistsError
from daskrecon.runtime.defaults import default

__all__ = ["OMEImage", "is_ome_zarr", "open_ome_zarr", "pyramid_factors", "write_ome_zarr"]

#: NGFF versions written: 0.4 stores Zarr v2 arrays (what most viewers read today), 0.5 Zarr v3.
VERSIONS = ("0.4", "0.5")
#: Downsampling of the pyramid's levels (``ome-zarr``'s methods): ``local_mean`` averages each
#: 2×2(×2) block (what a viewer shows when it zooms out), ``nearest`` keeps one voxel of it,
#: ``resize`` interpolates with anti-aliasing.
METHODS = ("local_mean", "nearest", "resize")
#: The default pyramid stops once the largest spatial side fits in this many voxels ...
TOP_LEVEL_SIDE = 256
#: ... or before any spatial side would fall below this.
MIN_SIDE = 8

_TYPE_OF_NAME = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_SPACE_NAMES = {2: ("y", "x"), 3: ("z", "y", "x")}


def _require() -> Any:
    try:
        import ome_zarr.writer  # noqa: F401
    except ImportError:
        raise ImportError('OME-Zarr needs the ome-zarr library: pip install "daskrecon[ome]"') from None
    import ome_zarr

    return ome_zarr


@dataclass(frozen=True)
class OMEImage:
    """One resolution level of an OME-Zarr image, in deepinv's layout.

    Attributes
    ----------
    data : dask.array.Array
        The level, lazily read chunk by chunk, shaped ``(B, C, H, W)`` or ``(B, C, D, H, W)``.
    axes : tuple of str
        The file's axis names, in the file's order (e.g. ``("c", "z", "y", "x")``).
    types : tuple of str
        Each axis' type (``"time"``, ``"channel"``, ``"space"``).
    voxel_size : dict
        The physical size of one voxel of this level along each axis of the file (1.0 where the file
        gives none).
    units : dict
        The unit of each axis that has one (e.g. ``{"y": "micrometer"}``).
    translation : dict
        Where this level's first voxel sits along each axis (0.0 where the file gives none).
    level : int
        Which level was read (0 is the full resolution).
    levels : int
        How many levels the image has.
    path : str
        Where it was read from.
    """

    data: da.Array
    axes: tuple[str, ...]
    types: tuple[str, ...]
    voxel_size: dict[str, float]
    units: dict[str, str] = field(default_factory=dict)
    translation: dict[str, float] = field(default_factory=dict)
    level: int = 0
    levels: int = 1
    path: str = ""

    @property
    def spatial_axes(self) -> tuple[str, ...]:
        """The space axes' names, in the file's order (deepinv's ``[D,] H, W``)."""
        return tuple(a for a, t in zip(self.axes, self.types) if t == "space")

    def to_file_layout(self, x: Any) -> Any:
        """``x`` in deepinv's layout (this image's shape, or another size along its space axes) as the
        file lays it out: the batch and channel axes the file does not have dropped (they must be 1)."""
        keep = []
        if "time" in self.types:
            keep.append(0)
        elif x.shape[0] != 1:
            raise OMEZarrError(f"the signal has a batch of {x.shape[0]}, and {self.path!r} has no time axis to hold it")
        if "channel" in self.types:
            keep.append(1)
        elif x.shape[1] != 1:
            raise OMEZarrError(f"the signal has {x.shape[1]} channels, and {self.path!r} has no channel axis")
        keep += list(range(2, x.ndim))
        if x.ndim - 2 != len(self.spatial_axes):
            raise OMEZarrError(f"the signal has {x.ndim - 2} spatial axes, and {self.path!r} has "
                               f"{len(self.spatial_axes)} ({', '.join(self.spatial_axes)})")
        return x[tuple(slice(None) if i in keep else 0 for i in range(x.ndim))]


def _axis_types(axes: Sequence[Any], path: str) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    names, types, units = [], [], {}
    for a in axes:
        name = a if isinstance(a, str) else a["name"]
        kind = (None if isinstance(a, str) else a.get("type")) or _TYPE_OF_NAME.get(name)
        if kind not in ("time", "channel", "space"):
            raise OMEZarrError(
                f"{path!r}: axis {name!r} (type {kind!r}) has no place in deepinv's (B, C, [D,] H, W): daskrecon maps "
                "a time axis to B, a channel axis to C and 2 or 3 space axes to [D,] H, W")
        names.append(name)
        types.append(kind)
        if not isinstance(a, str) and a.get("unit"):
            units[name] = a["unit"]
    n_space = types.count("space")
    if n_space not in (2, 3) or types.count("time") > 1 or types.count("channel") > 1:
        raise OMEZarrError(f"{path!r} has axes {names} of types {types}: daskrecon reads images with 2 or 3 space "
                           "axes, at most one time axis and at most one channel axis")
    return tuple(names), tuple(types), units


def _to_deepinv(data: da.Array, types: tuple[str, ...]) -> da.Array:
    """``data`` (the file's axis order) as ``(B, C, [D,] H, W)``."""
    order = ([types.index("time")] if "time" in types else []) + \
            ([types.index("channel")] if "channel" in types else []) + \
            [i for i, t in enumerate(types) if t == "space"]
    data = data.transpose(order)
    if "time" not in types:
        data = data[None]
    if "channel" not in types:
        data = data[:, None]
    return data


def _transforms(node_meta: Mapping[str, Any], level: int, axes: tuple[str, ...]) -> tuple[dict, dict]:
    scale = dict.fromkeys(axes, 1.0)
    shift = dict.fromkeys(axes, 0.0)
    transforms = node_meta.get("coordinateTransformations") or []
    for t in (transforms[level] if level < len(transforms) and transforms[level] else []):
        if t.get("type") == "scale" and "scale" in t:
            scale = {a: float(s) for a, s in zip(axes, t["scale"])}
        elif t.get("type") == "translation" and "translation" in t:
            shift = {a: float(s) for a, s in zip(axes, t["translation"])}
    return scale, shift


def open_ome_zarr(path: str, level: int = 0) -> OMEImage:
    """Read one resolution level of an OME-Zarr image, lazily, in deepinv's layout.

    Parameters
    ----------
    path : str
        The image's group: a local path or an fsspec URL (``s3://…``), NGFF 0.4 or 0.5.
    level : int, default 0
        Which level of the pyramid (0: full resolution; ``-1``: the coarsest).

    Returns
    -------
    OMEImage
        ``.data`` the level as a dask array ``(B, C, [D,] H, W)`` (read chunk by chunk by whoever
        computes it; nothing is read now), and the file's axes, voxel size and units.

    Raises
    ------
    OMEZarrError
        ``path`` is not an OME-Zarr image (a plain array, a plate, nothing there), ``level`` is
        not one of its levels, or its axes do not map to deepinv's layout.
    ImportError
        The ``ome-zarr`` library is not installed (``pip install "daskrecon[ome]"``).
    """
    _require()
    import logging

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    from fsspec.core import url_to_fs

    path = str(path)
    fs, root = url_to_fs(path)
    if not fs.exists(root):
        raise OMEZarrError(f"no OME-Zarr image at {path!r}: nothing is there")
    # ome-zarr logs a "version mismatch" warning for every 0.4 image it opens: quiet for this read only,
    # the user's logging configuration left as it was
    quiet = logging.getLogger("ome_zarr")
    before = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        loc = parse_url(path)
        nodes = [] if loc is None else [n for n in Reader(loc)() if any(isinstance(s, Multiscales) for s in n.specs)]
    finally:
        quiet.setLevel(before)
    if not nodes:
        raise OMEZarrError(f"{path!r} is not an OME-Zarr image (no 'multiscales' metadata): open a plain Zarr array "
                           "with dask.array.from_zarr, or a plate's image by its own path (plate/row/col/field)")
    node = nodes[0]
    n_levels = len(node.data)
    if not -n_levels <= level < n_levels:
        raise OMEZarrError(f"{path!r} has {n_levels} levels (0 … {n_levels - 1}); level {level} does not exist")
    level %= n_levels
    axes, types, units = _axis_types(node.metadata.get("axes") or [], path)
    scale, shift = _transforms(node.metadata, level, axes)
    return OMEImage(data=_to_deepinv(node.data[level], types), axes=axes, types=types, voxel_size=scale,
                    units=units, translation=shift, level=level, levels=n_levels, path=path)


def is_ome_zarr(path: str) -> bool:
    """Whether ``path`` is a Zarr group with OME multiscales metadata (NGFF 0.4 or 0.5), read from its
    metadata only."""
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception:
        return False
    attrs = dict(g.attrs)
    return "multiscales" in attrs or "multiscales" in (attrs.get("ome") or {})


def pyramid_factors(shape: Sequence[int], levels: int | None = None) -> list[int]:
    """The downsampling factor of each level after the first: every space axis halves per level.

    ``shape`` is the space axes' sizes. With ``levels=None``, levels are added until the largest
    side fits in :data:`TOP_LEVEL_SIDE` voxels, stopping before any side would fall below
    :data:`MIN_SIDE`; ``levels`` counts level 0 (``levels=1``: no pyramid).
    """
    if levels is not None:
        if levels < 1:
            raise ValueError(f"levels={levels}: an image has at least its full-resolution level (levels=1)")
        if min(shape) // 2 ** (levels - 1) < 1:
            raise ValueError(f"levels={levels}: a side of {min(shape)} voxels halves to nothing before level "
                             f"{levels - 1}; at most {int(math.log2(min(shape))) + 1} levels")
        return [2 ** k for k in range(1, levels)]
    out = []
    k = 1
    while max(shape) // 2 ** (k - 1) > TOP_LEVEL_SIDE and min(shape) // 2 ** k >= MIN_SIDE:
        out.append(2 ** k)
        k += 1
    return out


def _file_axes(x_ndim: int, batch: int, channels: int, like: OMEImage | None,
               voxel_size: Any, units: Any) -> tuple[list[dict], dict[str, float], dict[str, str], tuple[str, ...]]:
    """The axes to write (NGFF dicts), the voxel size and units per axis, and the types."""
    n_space = x_ndim - 2
    if like is not None:
        names, types = list(like.axes), list(like.types)
        scale = {a: like.voxel_size.get(a, 1.0) for a in names}
        unit = dict(like.units)
    else:
        names = (["t"] if batch > 1 else []) + ["c"] + list(_SPACE_NAMES[n_space])
        types = [_TYPE_OF_NAME[n] for n in names]
        scale = dict.fromkeys(names, 1.0)
        unit = {}
    space = [a for a, t in zip(names, types) if t == "space"]
    if voxel_size is not None:
        if isinstance(voxel_size, Mapping):
            unknown = set(voxel_size) - set(space)
            if unknown:
                raise ValueError(f"voxel_size names {sorted(unknown)}; the space axes are {space}")
            scale.update({a: float(v) for a, v in voxel_size.items()})
        else:
            vs = [float(voxel_size)] * len(space) if np.isscalar(voxel_size) else [float(v) for v in voxel_size]
            if len(vs) != len(space):
                raise ValueError(f"voxel_size {voxel_size!r} gives {len(vs)} sizes for {len(space)} space axes {space}")
            scale.update(zip(space, vs))
        if any(not v > 0 for v in scale.values()):
            raise ValueError(f"voxel sizes must be positive: {scale}")
    if units is not None:
        unit.update({a: units for a in space} if isinstance(units, str) else dict(units))
    axes = [{"name": a, "type": t, **({"unit": unit[a]} if a in unit else {})} for a, t in zip(names, types)]
    return axes, scale, unit, tuple(types)


def write_ome_zarr(
    x: Any,
    path: str,
    *,
    like: OMEImage | None = None,
    voxel_size: float | Sequence[float] | Mapping[str, float] | None = None,
    units: str | Mapping[str, str] | None = None,
    version: str = "0.4",
    levels: int | None = None,
    method: str = "local_mean",
    chunks: Sequence[int] | None = None,
    name: str = "daskrecon",
    overwrite: bool = False,
    ctx: Any = None,
) -> str:
    """Write a signal as an OME-Zarr multiscale image: level 0 and a pyramid, computed chunk by chunk.

    Parameters
    ----------
    x : dask.array.Array, torch.Tensor or numpy.ndarray
        The signal in deepinv's layout, ``(B, C, H, W)`` or ``(B, C, D, H, W)``. A dask array (e.g.
        :func:`daskrecon.reconstruct`'s out-of-core result, read from its last checkpoint slot) is
        written by the workers chunk by chunk, the pyramid's levels too: no level is assembled in
        one place.
    path : str
        Where: a local path (conventionally ``*.ome.zarr``) or an fsspec URL. With a dask array on
        a cluster, every worker must see it (checked first).
    like : OMEImage, optional
        The image this signal reconstructs (from :func:`open_ome_zarr`): its axes, voxel size and
        units are copied (the batch and channel axes it lacks are dropped from ``x``; they must be
        of size 1).
    voxel_size : float, sequence or mapping, optional
        The physical size of a voxel along the space axes (``[D,] H, W`` order, or by axis name):
        overrides ``like``'s; 1.0 without either.
    units : str or mapping, optional
        The space axes' unit (e.g. ``"micrometer"``), or a unit per axis name.
    version : {"0.4", "0.5"}
        The NGFF version: 0.4 writes Zarr v2 arrays (the widest viewer support), 0.5 Zarr v3.
    levels : int, optional
        How many levels, counting level 0; every space axis halves per level. Default: until the
        largest side fits in 256 voxels (:func:`pyramid_factors`).
    method : {"local_mean", "nearest", "resize"}
        How a level is downsampled from the previous one.
    chunks : sequence of int, optional
        Chunk shape of every level, in the file's axis order; default: ``x``'s chunks (a dask
        array's) or Dask's automatic ones.
    name : str
        The image's name in the metadata.
    overwrite : bool, default False
        Replace what is at ``path``. Without it an existing ``path`` is refused: nothing is
        deleted.
    ctx : DistributedContext, optional
        The context whose cluster computes a dask ``x`` (bounded by its stall timeout); default:
        Dask's current client (bounded by ``daskrecon.context.stall-timeout``), or the local
        scheduler. Where workers write, they are first checked to see the target's folder.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    OutputExistsError
        Something is at ``path`` and ``overwrite`` is False.
    OverwriteSourceError
        ``x`` is read from a Zarr array at ``path`` (or inside it): replacing it would lose the data.
    StorageNotSharedError
        The workers cannot see ``path``'s folder.
    OMEZarrError
        ``x`` does not fit ``like``'s axes.
    """
    _require()
    from fsspec.core import url_to_fs
    from ome_zarr.format import format_from_version
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image

    from daskrecon.runtime.storage import check_not_source
    from daskrecon.runtime.waiting import compute

    path = str(path)
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: daskrecon writes NGFF {' or '.join(VERSIONS)}")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: one of {', '.join(METHODS)}")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if x.ndim not in (4, 5):
        raise ValueError(f"x has shape {tuple(x.shape)}: write_ome_zarr takes (B, C, H, W) or (B, C, D, H, W)")
    axes, scale, unit, types = _file_axes(x.ndim, x.shape[0], x.shape[1], like, voxel_size, units)
    if like is not None:
        data = like.to_file_layout(x)
    else:
        data = x if x.shape[0] > 1 else x[0]
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=tuple(chunks) if chunks else "auto")
    elif chunks:
        data = data.rechunk(tuple(chunks))
    if len(data.shape) != len(axes):
        raise OMEZarrError(f"the signal as laid out for the file has shape {data.shape}, and the axes are "
                           f"{[a['name'] for a in axes]}")
    space = [a["name"] for a in axes if a["type"] == "space"]
    factors = pyramid_factors([data.shape[i] for i, t in enumerate(types) if t == "space"], levels)
    fs, root = url_to_fs(path)
    if fs.exists(root):
        check_not_source(data, path)
        if not overwrite:
            raise OutputExistsError(f"{path!r} exists: pass overwrite=True to replace it, or another path")
        fs.rm(root, recursive=True)
    parent = fs._parent(root)
    fs.makedirs(parent, exist_ok=True)
    client = getattr(ctx, "client", None)
    stall_timeout = getattr(ctx, "stall_timeout", None)
    if client is None:
        from distributed import default_client

        try:
            client = default_client()
        except ValueError:
            client = None  # Dask's local scheduler: this process writes
        stall_timeout = default("context.stall-timeout")
    if client is not None:  # workers write the chunks: they must see the folder (else holes read as zeros)
        from types import SimpleNamespace

        from daskrecon.runtime.storage import check_shared

        check_shared(SimpleNamespace(client=client, stall_timeout=stall_timeout), fs, parent, path,
                     why="the workers write the OME-Zarr image there",
                     hint="write it to a folder that the driver and every worker see (a shared file system) "
                          "or an fsspec URL (s3://…)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*too small to downsample.*")
            delayed = write_image(
                data, path, scale_factors=[{a: f for a in space} for f in factors], method=Methods(method),
                fmt=format_from_version(version), axes=axes, scale=scale, axes_units=unit or None,
                name=name, compute=False)
        compute(delayed, client=client, what="writing the OME-Zarr image", stall_timeout=stall_timeout, writes=True)
    except BaseException:
        # the metadata goes first: a half-written image would open in a viewer with holes read as zeros
        if fs.exists(root):
            fs.rm(root, recursive=True)
        raise
    return path
