"""Image files in and out for the batch command: Zarr (lazy), NPY, PNG, TIFF, OME-Zarr; local paths or fsspec URLs.

Inputs are read as deepinv's layout, ``(1, C, H, W)`` or ``(1, C, D, H, W)``; outputs are written
so that nothing that exists is replaced without ``overwrite`` and nothing is written over the arrays
the result is read from (:func:`daskrecon.runtime.storage.check_not_source`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon.errors import ConfigError
from daskrecon.frontend.omezarr import is_ome_zarr
from daskrecon.runtime.waiting import compute

__all__ = [
    "filesystem",
    "input_shape",
    "is_ome_path",
    "is_url",
    "is_zarr",
    "open_ome",
    "read_image",
    "read_lazy",
    "resolve",
    "suffix_of",
    "write_image",
]


def suffix_of(path: str) -> str:
    return os.path.splitext(path.rstrip("/"))[1].lower()


def is_ome_path(path: str) -> bool:
    """An output named ``*.ome.zarr`` is written as an OME-Zarr image (the NGFF naming convention)."""
    return path.rstrip("/").lower().endswith(".ome.zarr")


def is_url(p: str) -> bool:
    return "://" in p


def resolve(base: Path, p: str) -> str:
    """``p`` taken relative to the config's folder ``base``; a URL (``s3://…``) as it is."""
    if is_url(p):
        return p
    q = Path(p)
    return str(q if q.is_absolute() else base / q)


def filesystem(path: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def is_zarr(path: str) -> bool:
    fs, root = filesystem(path)
    return suffix_of(path) == ".zarr" or fs.isdir(root)


def input_shape(path: str, level: int = 0) -> tuple[int, ...]:
    """The shape an input will have (at least 4-D), read from its metadata only (images: ``(1, 1 or 3, H, W)``)."""
    fs, root = filesystem(path)
    if not fs.exists(root):
        raise ConfigError(f"input {path!r} does not exist")
    if is_zarr(path) and is_ome_zarr(path):
        return tuple(open_ome(path, level).data.shape)
    if is_zarr(path):
        import zarr

        try:
            shape = tuple(zarr.open_array(path, mode="r").shape)
        except Exception as exc:
            raise ConfigError(f"{path!r} is not a readable Zarr array: {exc}") from None
    elif suffix_of(path) == ".npy":
        with fs.open(root, "rb") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            shape = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(f)[0]
    else:
        return (1, 3, 0, 0)  # an image file: read as 1 or 3 channels, its size does not matter here
    return (1,) * max(0, 4 - len(shape)) + tuple(shape)


def open_ome(path: str, level: int) -> Any:
    from daskrecon.errors import OMEZarrError
    from daskrecon.frontend.omezarr import open_ome_zarr

    try:
        return open_ome_zarr(path, level)
    except OMEZarrError as exc:
        raise ConfigError(f"input: {exc}") from None


def read_lazy(path: str | Path, level: int = 0) -> Any:
    """A Zarr input as a lazy dask array (float32; 2-D/3-D arrays made ``(1, C, H, W)``, 4-D/5-D as stored;
    an OME-Zarr image's ``level`` with its axes mapped to ``(B, C, [D,] H, W)``), any other file as a
    tensor (:func:`read_image`). ``path``: a local path or an fsspec URL."""
    path = str(path)
    if not is_zarr(path):
        return torch.from_numpy(read_image(path))
    if not filesystem(path)[0].exists(filesystem(path)[1]):
        raise ConfigError(f"input {path!r} does not exist")
    if is_ome_zarr(path):
        return open_ome(path, level).data.astype(np.float32)
    try:
        a = da.from_zarr(path)
    except Exception as exc:
        raise ConfigError(f"{path!r} is not a readable Zarr array: {exc}") from None
    while a.ndim < 4:
        a = a[None]
    return a.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """An image as float32 ``(1, C, H, W)`` (a volume ``(1, C, D, H, W)`` from a 5-D Zarr / .npy array or
    a TIFF stack): Zarr / .npy arrays as stored (made at least 4-D), PNG/TIFF scaled to [0, 1], a TIFF's
    axes read from the file (:func:`_read_tiff`). ``path``: a local path or an fsspec URL."""
    path = str(path)
    fs, root = filesystem(path)
    if not fs.exists(root):
        raise ConfigError(f"input {path!r} does not exist")
    if is_zarr(path) and is_ome_zarr(path):
        a = np.asarray(open_ome(path, 0).data, dtype=np.float32)
    elif is_zarr(path):
        import zarr

        try:
            a = np.asarray(zarr.open_array(path, mode="r")[...], dtype=np.float32)
        except Exception as exc:
            raise ConfigError(f"{path!r} is not a readable Zarr array: {exc}") from None
    elif suffix_of(path) == ".npy":
        with fs.open(root, "rb") as f:
            a = np.load(f).astype(np.float32)
    elif suffix_of(path) in (".tif", ".tiff"):
        a = _read_tiff(fs.cat_file(root), path)
    else:
        import imageio.v3 as iio
        from skimage import util

        a = util.img_as_float32(iio.imread(fs.cat_file(root), extension=suffix_of(path)))
        a = a[None] if a.ndim == 2 else np.moveaxis(a[..., :3], -1, 0)
    while a.ndim < 4:
        a = a[None]
    return np.ascontiguousarray(a)


#: TIFF axes (tifffile's letters) taken as channels, and as the depth of a volume.
_TIFF_CHANNELS, _TIFF_DEPTH = ("S", "C"), ("Z", "Q", "I")


def _read_tiff(data: bytes, path: str) -> np.ndarray:
    """A TIFF as float32 ``(1, C, H, W)``, or ``(1, C, D, H, W)`` for a stack, scaled to [0, 1].

    The axes are the file's own (tifffile reads them from its tags, OME and ImageJ metadata
    included), not guessed from the array's shape: a (Z, Y, X) stack of 5 slices is a volume, not an
    RGB image of its first three columns. Axes of length 1 are dropped; time series and other
    axes are refused.
    """
    import io

    import tifffile
    from skimage import util

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        axes, a = series.axes.upper(), series.asarray()
    keep = [i for i, n in enumerate(a.shape) if n > 1 or axes[i] in "YX"]
    a, axes = a.reshape([a.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    unknown = [c for c in axes if c not in "YX" + "".join(_TIFF_CHANNELS + _TIFF_DEPTH)]
    chans, depth = [c for c in axes if c in _TIFF_CHANNELS], [c for c in axes if c in _TIFF_DEPTH]
    if unknown or len(chans) > 1 or len(depth) > 1 or "Y" not in axes or "X" not in axes:
        raise ConfigError(f"{path!r} has TIFF axes {axes!r} (shape {a.shape}): daskrecon reads images (Y, X), "
                          "colour images (Y, X, S) and stacks (Z, Y, X), with or without channels; save one "
                          "time point / position per file")
    order = [*chans, *depth, "Y", "X"]
    a = np.transpose(a, [axes.index(c) for c in order])
    if not chans:
        a = a[None]
    elif chans == ["S"] and a.shape[0] == 4:
        a = a[:3]  # RGBA: the alpha channel is not image
    return util.img_as_float32(a)[None]


def write_image(path: str | Path, x: Any, overwrite: bool, ctx: Any = None, ome: dict | None = None) -> str:
    """Write ``x`` (an array, or a dask array computed on ``ctx``'s cluster within its stall timeout) to
    ``path`` (a local path or an fsspec URL; the format from its suffix, ``*.ome.zarr`` an OME-Zarr
    image written by :func:`daskrecon.write_ome_zarr` with the keywords ``ome``); return where it was
    written.

    Formats: ``.zarr`` / ``.npy`` any signal as computed; ``.tif`` / ``.tiff`` an image or a volume
    (any channels) as float32, unclipped, in an ImageJ hyperstack with its axes; ``.png`` an 8-bit
    view (1 or 3 channels, clipped to [0, 1]).

    Without ``overwrite`` nothing that exists is replaced, also if it appeared since the run
    started: the result then goes to the first free ``<name>-<k><suffix>`` next to it (the
    output is never lost), and that path is returned.
    """
    path = str(path)
    fs = filesystem(path)[0]
    if overwrite:
        target = path
    else:
        target = _free_name(path)
    suffix = suffix_of(path)
    if is_ome_path(path):
        from daskrecon.frontend.omezarr import write_ome_zarr

        return write_ome_zarr(x, target, overwrite=overwrite, ctx=ctx, **(ome or {}))
    if isinstance(x, da.Array):
        if ctx is None:
            raise ValueError("writing a dask array needs the context whose cluster holds it")
        bound = dict(client=ctx.client, what="writing the result", stall_timeout=ctx.stall_timeout)
        if suffix == ".zarr":  # streams into Zarr chunk by chunk, written by the workers: they must see it
            from daskrecon.runtime.storage import check_not_source, check_shared

            if overwrite:
                check_not_source(x, target)

            tfs, troot = filesystem(target)
            parent = tfs._parent(troot)
            tfs.makedirs(parent, exist_ok=True)
            check_shared(ctx, tfs, parent, target, why="the workers write the result there",
                         hint="write the result to a folder that the driver and every worker see (a shared file "
                              "system) or an fsspec URL (s3://…), or as .npy/.png/.tif (written by the driver)")
            try:
                compute([x.to_zarr(target, overwrite=overwrite, compute=False)], writes=True, **bound)
            except BaseException:
                # this call made the store: half of it would read as zeros where chunks are missing
                if tfs.exists(troot):
                    tfs.rm(troot, recursive=True)
                raise
            return target
        x = np.asarray(compute([x], **bound)[0])
    if suffix == ".zarr":
        import zarr

        z = zarr.create_array(target, shape=x.shape, dtype=x.dtype, overwrite=overwrite)  # refuses an existing one
        z[...] = x
        return target
    if x.shape[0] != 1 and suffix not in (".npy", ".zarr"):
        raise ConfigError(f"{path!r}: a {suffix} file holds one image or volume, and the result has a batch of "
                          f"{x.shape[0]} (shape {tuple(x.shape)}); write it to .zarr or .npy")
    if suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, x)
        data = buf.getvalue()
    elif suffix in (".tif", ".tiff"):
        data = _tiff_bytes(np.asarray(x, dtype=np.float32)[0])
    else:
        import imageio.v3 as iio
        from skimage import util

        img = np.clip(x[0], 0, 1)
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        data = iio.imwrite("<bytes>", util.img_as_ubyte(img), extension=suffix)
    _write_bytes(fs, filesystem(target)[1], data, exclusive=not overwrite)
    return target


def _tiff_bytes(a: np.ndarray) -> bytes:
    """``(C, [D,] H, W)`` as a float32 ImageJ hyperstack (Fiji, napari and tifffile read its axes): values
    as computed, neither clipped nor quantised; a volume's axes ``ZCYX``, a single channel's dropped."""
    import io

    import tifffile

    if a.ndim == 4:
        a, axes = a.transpose(1, 0, 2, 3), "ZCYX"
    else:
        axes = "CYX"
    if a.shape[axes.index("C")] == 1:
        a, axes = a.squeeze(axes.index("C")), axes.replace("C", "")
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(a), imagej=True, metadata={"axes": axes})
    return buf.getvalue()


def _free_name(path: str) -> str:
    """``path`` when nothing is there, else the first free ``<stem>-<k><suffix>`` beside it."""
    fs, root = filesystem(path)
    if not fs.exists(root):
        return path
    stem, suffix = os.path.splitext(path.rstrip("/"))
    if is_ome_path(path):
        stem, suffix = stem[:-len(".ome")], stem[-len(".ome"):] + suffix
    k = 1
    while fs.exists(filesystem(f"{stem}-{k}{suffix}")[1]):
        k += 1
    return f"{stem}-{k}{suffix}"


def _write_bytes(fs: Any, root: str, data: bytes, exclusive: bool) -> None:
    """Write a file; ``exclusive``: fail rather than replace one that appeared meanwhile (atomic where local)."""
    from fsspec.implementations.local import LocalFileSystem

    if exclusive and isinstance(fs, LocalFileSystem):
        with open(root, "xb") as f:
            f.write(data)
        return
    if exclusive and fs.exists(root):
        raise FileExistsError(root)
    fs.pipe_file(root, data)
