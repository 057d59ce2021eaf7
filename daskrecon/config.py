"""``daskrecon reconstruct CONFIG``: a reconstruction described by a TOML (or YAML) file.

Example (every key shown; only ``measurements`` and ``operators`` are required)::

    [input]
    measurements = ["y0.zarr", "y1.png"]       # one per operator: .zarr (read lazily), .npy, .png, .tif;
                                               # volumes: 5-D (1, C, D, H, W) .zarr / .npy arrays,
                                               # TIFF stacks (axes read from the file: ZYX, ZCYX...);
                                               # OME-Zarr images (read lazily, axes mapped to (B, C, [D,] H, W))
    ground_truth = "x.png"                     # optional, for the PSNR
    level = 0                                  # which level of OME-Zarr inputs (0: full resolution)

    [[operators]]                              # in measurement order
    type = "blur"                              # blur | downsampling | inpainting | denoising
    sigma = [1.0, 1.0]                         # Gaussian kernel (blur); 3 values for a volume
    angle = 0.0
    padding = "circular"                       # deepinv Blur padding

    [denoiser]                                 # keys left out: daskrecon.denoiser.* of dask.config
    weights = "bundled"                        # bundled (DnCNN) | bundled-drunet (the demo's) | bundled-3d |
                                               # a state-dict file (loaded weights_only; deepinv's DRUNet or
                                               # DnCNN, sizes read from the weights)
    architecture = "drunet"                    # optional: checked against a weight file's
                                               # a colour network on grey measurements runs through
                                               # daskrecon.models.GreyThroughColour (said when it starts)
    patch_size = 256
    overlap = 8
    precision = "fp32"                         # fp32 | bf16 | fp16 | auto: the tiles' network (probed, see docs)
    precision_tol = 0.02                       # largest relative L2 error of the probe against fp32

    [solver]
    algorithm = "red"                          # pnp | red | fista | fista-red | hqs | admm | os-pnp | svrg |
                                               # mlem | osem (Poisson EM: with a [denoiser] section, its
                                               # one-step-late RED prior term) | sirt (CT; no denoiser) |
                                               # bsrem (relaxed OSEM; with a [denoiser] section, RED's gradient)
    iterations = 30                            # every [solver] / [checkpoint] key defaults as reconstruct()'s
    step_size = 0.3                            # or one per iteration: [0.5, 0.4, ...] (deepinv's lists)
    sigma_denoiser = 0.05                      # or one per iteration, e.g. DPIR's decreasing schedule
    red_weight = 0.3
    tol = 1e-4                                 # optional: stop when the relative change is below
    max_time = 3600                            # optional: wall-clock budget in seconds
    n_subsets = 4                              # os-pnp | svrg | osem | bsrem: operator subsets (required for them)
    seed = 0                                   # os-pnp | svrg | osem: seed of the subset order
    cg_max_iter = 50                           # hqs | admm: conjugate gradient of the data prox
    cg_tol = 1e-5
    prox_solver = "auto"                       # hqs | admm: "auto" (FFT for circular blurs) | "cg" | "fourier"

    [output]
    path = "result.zarr"                       # .zarr, .npy (any signal), .png, .tif (an image of 1 or 3 channels),
                                               # .ome.zarr: an OME-Zarr pyramid, axes / voxel size / units copied
                                               # from the OME-Zarr ground truth or signal-sized measurement
    ngff = "0.4"                               # .ome.zarr: NGFF version, "0.4" (Zarr v2) or "0.5" (Zarr v3)
    levels = 4                                 # .ome.zarr: pyramid levels with level 0 (default: until <= 256 voxels)
    voxel_size = [2.0, 0.5, 0.5]               # .ome.zarr: overrides the input's ([D,] H, W order)
    units = "micrometer"                       # .ome.zarr: overrides the input's
    overwrite = false                          # also at write time: a file that appeared meanwhile is kept,
                                               # the result goes next to it (result-1.zarr) and the run says so

    [checkpoint]                               # optional
    path = "ckpt"                              # a folder every worker sees, or an fsspec URL
    every = 1
    resume = true
    scratch = "/shared/tmp"                    # where out-of-core runs without a path keep their iterate
                                               # (default: the driver's temporary directory)

    [cluster]
    kind = "local"                             # local | cuda | slurm | address
    n_workers = 2                              # local / cuda
    address = "tcp://host:8786"                # address
    jobs = 4                                   # slurm: SLURMCluster(**[cluster.slurm]).scale(jobs=...)

Paths are taken relative to the config's folder; a URL (``s3://…``, ``file://…``, anything with
``://``) is used as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch

from daskrecon import errors
from daskrecon.engine.algorithms import ALGORITHMS
from daskrecon.engine.options import SUBSET_ALGORITHMS, ReconstructOptions
from daskrecon.engine.problem import iterate_chunks
from daskrecon.errors import DaskreconError
from daskrecon.frontend.omezarr import is_ome_zarr
from daskrecon.operators.chunkwise import local_form
from daskrecon.planning.precision import check_precision
from daskrecon.runtime.arrays import as_numpy
from daskrecon.runtime.defaults import pick
from daskrecon.runtime.waiting import bounded, compute

__all__ = ["ConfigError", "OutputExistsError", "load_config", "run_config"]

_SECTIONS = {"input", "operators", "denoiser", "solver", "output", "checkpoint", "cluster"}
_OPERATORS = {"blur", "downsampling", "inpainting", "denoising"}
_KEYS = {
    "input": {"measurements", "ground_truth", "level"},
    "operators": {"type", "sigma", "angle", "padding", "factor", "filter", "mask"},
    "denoiser": {"weights", "architecture", "patch_size", "overlap", "precision", "precision_tol"},
    "solver": {"algorithm", "iterations", "step_size", "sigma_denoiser", "red_weight", "tol", "max_time", "n_subsets",
               "seed", "cg_max_iter", "cg_tol", "prox_solver"},
    "output": {"path", "overwrite", "ngff", "levels", "voxel_size", "units"},
    "checkpoint": {"path", "every", "resume", "scratch"},
    "cluster": {"kind", "n_workers", "address", "timeout", "jobs", "slurm"},
}


class ConfigError(DaskreconError, ValueError):
    """A configuration file is invalid; the message names the key and the fix."""


class OutputExistsError(ConfigError, errors.OutputExistsError):
    """The output path was taken while the run went on (``output.overwrite = false``): the result went next to it."""


def _get(d: dict, key: str, where: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise ConfigError(f"missing key {where}.{key}")
        return default
    v = d[key]
    if float in (kind if isinstance(kind, tuple) else (kind,)) and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key} must be {names}, got {v!r}")
    return v


def load_config(path: str | Path) -> dict:
    """Read and check a TOML/YAML config; relative paths are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need pyyaml (pip install pyyaml), or use TOML") from None
        cfg = yaml.safe_load(text) or {}
    else:
        import tomllib

        try:
            cfg = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path.name} is not valid TOML: {exc}") from None
    unknown = set(cfg) - _SECTIONS
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    for section, keys in _KEYS.items():
        tables = cfg.get(section, {})
        for j, table in enumerate(tables if isinstance(tables, list) else [tables]):
            extra = set(table) - keys if isinstance(table, dict) else set()
            if extra:
                name = f"{section}[{j}]" if isinstance(tables, list) else section
                raise ConfigError(f"unknown keys {sorted(extra)} in {name}; known: {sorted(keys)}")
    base = path.parent
    inp = _get(cfg, "input", "config", dict)
    meas = _get(inp, "measurements", "input", list)
    ops = _get(cfg, "operators", "config", list)
    if len(ops) != len(meas):
        raise ConfigError(f"{len(ops)} [[operators]] for {len(meas)} input.measurements: give one operator per measurement")
    for i, op in enumerate(ops):
        t = _get(op, "type", f"operators[{i}]", str)
        if t not in _OPERATORS:
            raise ConfigError(f"operators[{i}].type must be one of {sorted(_OPERATORS)}, got {t!r}")
    algorithm = cfg.get("solver", {}).get("algorithm", "pnp")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"solver.algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    n_subsets = _get(cfg.get("solver", {}), "n_subsets", "solver", int, None)
    if algorithm in SUBSET_ALGORITHMS:
        if n_subsets is None:
            raise ConfigError(f"solver.algorithm = {algorithm!r} needs solver.n_subsets (how many operator subsets, "
                              f"at most the {len(ops)} operators)")
        if not 1 <= n_subsets <= len(ops):
            raise ConfigError(f"solver.n_subsets must be between 1 and the number of operators ({len(ops)}), "
                              f"got {n_subsets}")
    elif n_subsets is not None:
        raise ConfigError(f"solver.n_subsets applies to algorithm {' or '.join(map(repr, SUBSET_ALGORITHMS))}, not {algorithm!r}: remove it "
                          "or change the algorithm")
    den = cfg.get("denoiser", {})
    try:
        check_precision(pick(_get(den, "precision", "denoiser", str, None), "denoiser.precision"),
                        _get(den, "precision_tol", "denoiser", float, None))
    except ValueError as exc:
        raise ConfigError(f"denoiser: {exc}") from None
    prox_solver = _get(cfg.get("solver", {}), "prox_solver", "solver", str, "auto")
    if prox_solver not in ("auto", "cg", "fourier"):
        raise ConfigError(f"solver.prox_solver must be 'auto', 'cg' or 'fourier', got {prox_solver!r}")
    _check_output(cfg, base)
    _check_apart(cfg, base)
    cfg["_base"] = base
    return cfg


def _location(base: Path, p: str) -> str:
    """Where ``p`` points, comparable with another location: symlinks resolved for local paths."""
    p = _resolve(base, p)
    if p.startswith("file://"):
        p = p[len("file://"):]
    if _is_url(p):
        return p.rstrip("/")
    return os.path.realpath(p)


def _relation(a: str, b: str) -> str | None:
    """How location ``a`` stands to ``b``: "is", "holds", "lies inside", or None when apart."""
    if a == b:
        return "is"
    if b.startswith(a.rstrip("/") + "/"):
        return "holds"
    if a.startswith(b.rstrip("/") + "/"):
        return "lies inside"
    return None


def _check_apart(cfg: dict, base: Path) -> None:
    """The output and the checkpoint never write over an input, nor the output over the checkpoint.

    Writing the result replaces what is at ``output.path`` (with ``overwrite``) while the run may still
    read from its inputs and its checkpoint: the same location, or one inside the other, would destroy
    the user's data, whatever ``overwrite`` says.
    """
    inp = cfg["input"]
    inputs = [(f"input.measurements[{i}]", p) for i, p in enumerate(inp["measurements"])]
    if inp.get("ground_truth") is not None:
        inputs.append(("input.ground_truth", _get(inp, "ground_truth", "input", str)))
    out = _get(cfg.get("output", {}), "path", "output", str, "result.zarr")
    ckpt = _get(cfg.get("checkpoint", {}), "path", "checkpoint", str, None)
    here = _location(base, out)
    for name, p in inputs:
        rel = _relation(here, _location(base, p))
        if rel:
            raise ConfigError(f"output.path {out!r} {rel} {name} {p!r}: writing the result there would destroy that "
                              f"input; choose another output path")
    if ckpt is None:
        return
    there = _location(base, ckpt)
    rel = _relation(here, there)
    if rel in ("is", "holds"):
        raise ConfigError(f"output.path {out!r} {rel} checkpoint.path {ckpt!r}: the result is streamed from the "
                          f"checkpoint while it is written, and writing it there would destroy both; choose another "
                          f"output path")
    for name, p in inputs:
        # a checkpoint folder that holds the inputs is fine: daskrecon touches only the arrays it made there
        rel = _relation(there, _location(base, p))
        if rel in ("is", "lies inside"):
            raise ConfigError(f"checkpoint.path {ckpt!r} {rel} {name} {p!r}: the checkpoint's arrays would be written "
                              f"into that input; choose another checkpoint folder")


#: Output formats: what each can hold.
OUTPUT_FORMATS = {".zarr": "any signal", ".npy": "any signal", ".png": "an image of 1 or 3 channels",
                  ".tif": "an image of 1 or 3 channels", ".tiff": "an image of 1 or 3 channels"}


def _check_output(cfg: dict, base: Path) -> None:
    """The output's format against the problem's dimensions, before anything runs."""
    out = cfg.get("output", {})
    path = _get(out, "path", "output", str, "result.zarr")
    _get(out, "overwrite", "output", bool, False)
    suffix = _suffix(path)
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"output.path {path!r} must end in one of {', '.join(OUTPUT_FORMATS)} (the format to write); "
                          f"e.g. {path.rstrip('/') + '.zarr'!r}")
    inp = cfg["input"]
    level = _get(inp, "level", "input", int, 0)
    ome_keys = sorted(k for k in ("ngff", "levels", "voxel_size", "units") if k in out)
    if not _is_ome_path(path):
        if ome_keys:
            raise ConfigError(f"output {ome_keys} apply to an OME-Zarr output: name it *.ome.zarr, or remove them")
    else:
        _ome_options(out)
    if suffix in (".zarr", ".npy"):
        return
    source = inp.get("ground_truth") or inp["measurements"][0]
    shape = input_shape(_resolve(base, source), level)
    if len(shape) == 5:
        raise ConfigError(f"output.path {path!r}: a {suffix} file holds a 2-D image, and this problem's signal is a "
                          f"volume {shape}; write it to .zarr or .npy")
    if shape[1] not in (1, 3):
        raise ConfigError(f"output.path {path!r}: a {suffix} file holds 1 or 3 channels, and this problem's signal has "
                          f"{shape[1]}; write it to .zarr or .npy")


def _suffix(path: str) -> str:
    return os.path.splitext(path.rstrip("/"))[1].lower()


def _is_ome_path(path: str) -> bool:
    """An output named ``*.ome.zarr`` is written as an OME-Zarr image (the NGFF naming convention)."""
    return path.rstrip("/").lower().endswith(".ome.zarr")


def _ome_options(out: dict) -> dict:
    """``[output]``'s OME-Zarr keys as :func:`daskrecon.write_ome_zarr`'s keywords, checked."""
    from daskrecon.frontend.omezarr import VERSIONS

    version = _get(out, "ngff", "output", str, "0.4")
    if version not in VERSIONS:
        raise ConfigError(f"output.ngff must be one of {list(VERSIONS)}, got {version!r}")
    levels = _get(out, "levels", "output", int, None)
    if levels is not None and levels < 1:
        raise ConfigError(f"output.levels must be at least 1 (the full-resolution level), got {levels}")
    voxel = _get(out, "voxel_size", "output", (list, float, int), None)
    if voxel is not None and any(not isinstance(v, int | float) or v <= 0 for v in np.atleast_1d(voxel).tolist()):
        raise ConfigError(f"output.voxel_size must be positive numbers ([D,] H, W order), got {voxel!r}")
    units = _get(out, "units", "output", str, None)
    return dict(version=version, levels=levels, voxel_size=voxel, units=units)


def _is_url(p: str) -> bool:
    return "://" in p


def _resolve(base: Path, p: str) -> str:
    """``p`` taken relative to the config's folder ``base``; a URL (``s3://…``) as it is."""
    if _is_url(p):
        return p
    q = Path(p)
    return str(q if q.is_absolute() else base / q)


def _fs(path: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(path)


def _is_zarr(path: str) -> bool:
    fs, root = _fs(path)
    return _suffix(path) == ".zarr" or fs.isdir(root)


def input_shape(path: str, level: int = 0) -> tuple[int, ...]:
    """The shape an input will have (at least 4-D), read from its metadata only (images: ``(1, 1 or 3, H, W)``)."""
    fs, root = _fs(path)
    if not fs.exists(root):
        raise ConfigError(f"input {path!r} does not exist")
    if _is_zarr(path) and is_ome_zarr(path):
        return tuple(_open_ome(path, level).data.shape)
    if _is_zarr(path):
        import zarr

        try:
            shape = tuple(zarr.open_array(path, mode="r").shape)
        except Exception as exc:
            raise ConfigError(f"{path!r} is not a readable Zarr array: {exc}") from None
    elif _suffix(path) == ".npy":
        with fs.open(root, "rb") as f:
            fmt = np.lib.format
            major, _ = fmt.read_magic(f)
            shape = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(f)[0]
    else:
        return (1, 3, 0, 0)  # an image file: read as 1 or 3 channels, its size does not matter here
    return (1,) * max(0, 4 - len(shape)) + tuple(shape)


#: ``--check`` reads Zarr inputs whole up to this size; with a larger one it times the configured
#: iteration out of core on a crop of the signal instead (:func:`_check_streamed`).
CHECK_MAX_BYTES = 2 * 2**30


def _open_ome(path: str, level: int) -> Any:
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
    if not _is_zarr(path):
        return torch.from_numpy(read_image(path))
    if not _fs(path)[0].exists(_fs(path)[1]):
        raise ConfigError(f"input {path!r} does not exist")
    if is_ome_zarr(path):
        return _open_ome(path, level).data.astype(np.float32)
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
    fs, root = _fs(path)
    if not fs.exists(root):
        raise ConfigError(f"input {path!r} does not exist")
    if _is_zarr(path) and is_ome_zarr(path):
        a = np.asarray(_open_ome(path, 0).data, dtype=np.float32)
    elif _is_zarr(path):
        import zarr

        try:
            a = np.asarray(zarr.open_array(path, mode="r")[...], dtype=np.float32)
        except Exception as exc:
            raise ConfigError(f"{path!r} is not a readable Zarr array: {exc}") from None
    elif _suffix(path) == ".npy":
        with fs.open(root, "rb") as f:
            a = np.load(f).astype(np.float32)
    elif _suffix(path) in (".tif", ".tiff"):
        a = _read_tiff(fs.cat_file(root), path)
    else:
        import imageio.v3 as iio
        from skimage import util

        a = util.img_as_float32(iio.imread(fs.cat_file(root), extension=_suffix(path)))
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

    Without ``overwrite`` nothing that exists is replaced, also if it appeared since the run
    started: the result then goes to the first free ``<name>-<k><suffix>`` next to it (the
    output is never lost), and that path is returned.
    """
    path = str(path)
    fs, root = _fs(path)
    if overwrite:
        target = path
    else:
        target = _free_name(path)
    suffix = _suffix(path)
    if _is_ome_path(path):
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

            tfs, troot = _fs(target)
            parent = tfs._parent(troot)
            tfs.makedirs(parent, exist_ok=True)
            check_shared(ctx, tfs, parent, target, why="the workers write the result there",
                         hint="write the result to a folder that the driver and every worker see (a shared file "
                              "system) or an fsspec URL (s3://…), or as .npy/.png/.tif (written by the driver)")
            compute([x.to_zarr(target, overwrite=overwrite, compute=False)], **bound)
            return target
        x = np.asarray(compute([x], **bound)[0])
    if suffix == ".zarr":
        import zarr

        z = zarr.create_array(target, shape=x.shape, dtype=x.dtype, overwrite=overwrite)  # refuses an existing one
        z[...] = x
        return target
    if suffix == ".npy":
        import io

        buf = io.BytesIO()
        np.save(buf, x)
        data = buf.getvalue()
    else:
        import imageio.v3 as iio
        from skimage import util

        img = np.clip(x[0], 0, 1)
        img = img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)
        data = iio.imwrite("<bytes>", util.img_as_ubyte(img), extension=suffix)
    _write_bytes(fs, _fs(target)[1], data, exclusive=not overwrite)
    return target


def _free_name(path: str) -> str:
    """``path`` when nothing is there, else the first free ``<stem>-<k><suffix>`` beside it."""
    fs, root = _fs(path)
    if not fs.exists(root):
        return path
    stem, suffix = os.path.splitext(path.rstrip("/"))
    if _is_ome_path(path):
        stem, suffix = stem[:-len(".ome")], stem[-len(".ome"):] + suffix
    k = 1
    while fs.exists(_fs(f"{stem}-{k}{suffix}")[1]):
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


def build_operator(spec: dict, i: int, shape: tuple[int, ...], base: Path | None = None,
                   region: tuple[slice, ...] | None = None) -> Any:
    """A deepinv operator from one ``[[operators]]`` table, for signals of ``shape``.

    A mask file is taken relative to ``base`` (the config's folder) and, with ``region`` (the
    spatial slices of a crop of the signal, ``shape`` being the crop's), cropped to it.
    """
    import deepinv as dinv
    from deepinv.physics.functional.blur import gaussian_blur

    where = f"operators[{i}]"
    t = spec["type"]
    if t == "blur":
        volume = len(shape) == 5
        sigma = _get(spec, "sigma", where, (list, float), [1.0] * (3 if volume else 2))
        sigma = tuple(float(v) for v in sigma) if isinstance(sigma, list) else (sigma,) * (3 if volume else 2)
        if len(sigma) != len(shape) - 2:
            raise ConfigError(f"{where}.sigma needs {len(shape) - 2} values for a {len(shape) - 2}-D signal of shape "
                              f"{shape}, got {list(sigma)}")
        if volume:
            from deepinv.physics.functional import gaussian_blur as gaussian_nd

            if _get(spec, "angle", where, float, 0.0):
                raise ConfigError(f"{where}.angle applies to 2-D blurs only; remove it for a volume")
            kernel = gaussian_nd(psf_size=None, sigma=sigma)
        else:
            kernel = gaussian_blur(sigma=sigma, angle=_get(spec, "angle", where, float, 0.0))
        return dinv.physics.Blur(filter=kernel, padding=_get(spec, "padding", where, str, "circular"))
    if t == "downsampling":
        return dinv.physics.Downsampling(img_size=shape[1:], factor=_get(spec, "factor", where, int, 2),
                                         filter=_get(spec, "filter", where, str, "gaussian"),
                                         padding=_get(spec, "padding", where, str, "circular"))
    if t == "inpainting":
        mask = _get(spec, "mask", where, (str, float), 0.5)
        if isinstance(mask, str):
            mask = torch.from_numpy(read_image(_resolve(base, mask) if base is not None else Path(mask))[0]) > 0.5
            if region is not None:
                mask = mask[(slice(None), *region)]
        return dinv.physics.Inpainting(img_size=shape[1:], mask=mask, rng=torch.Generator().manual_seed(i))
    return dinv.physics.Denoising()


def build_denoiser(spec: dict, base: Path) -> torch.nn.Module:
    from daskrecon.models import ARCHITECTURES, bundled_denoiser, bundled_denoiser_3d, bundled_drunet, load_network

    weights = _get(spec, "weights", "denoiser", str, "bundled")
    bundled = {"bundled": bundled_denoiser, "bundled-drunet": bundled_drunet, "bundled-3d": bundled_denoiser_3d}
    if weights in bundled:
        return bundled[weights]()
    arch = _get(spec, "architecture", "denoiser", str, None)
    if arch is not None and arch not in ARCHITECTURES:
        raise ConfigError(f"denoiser.architecture must be one of {list(ARCHITECTURES)}, got {arch!r}")
    path = _resolve(base, weights)
    if not Path(path).is_file():
        raise ConfigError(f"denoiser.weights must be one of {sorted(bundled)} or a weight file; "
                          f"{str(path)!r} does not exist")
    try:
        return load_network(path, arch)
    except ValueError as exc:
        raise ConfigError(f"denoiser.weights: {exc}") from None


def fit_channels(model: torch.nn.Module, shape: tuple[int, ...], echo: Any = print) -> torch.nn.Module:
    """``model`` for a signal of ``shape``: a colour network on a grey signal through
    :class:`~daskrecon.models.GreyThroughColour` (said); other mismatches refused."""
    from daskrecon.frontend.processing import input_channels
    from daskrecon.models import GreyThroughColour

    want = input_channels(model)
    if want is None or want == shape[1]:
        return model
    if (want, shape[1]) == (3, 1):
        echo("the denoiser is a colour network and the signal grey: its channel goes through it three times and "
             "the outputs are averaged (daskrecon.models.GreyThroughColour)")
        return GreyThroughColour(model)
    raise ConfigError(f"denoiser: the network takes {want}-channel signals, the measurements give {shape[1]} "
                      f"(shape {shape}); give weights for {shape[1]} channels (denoiser.weights)")


@contextlib.contextmanager
def make_context(spec: dict) -> Iterator[Any]:
    """A started :class:`DistributedContext` for ``[cluster]``; a cluster it starts (SLURM) is closed on exit."""
    import daskrecon as dr

    kind = _get(spec, "kind", "cluster", str, "local")
    if kind in ("local", "cuda"):
        with dr.DistributedContext(n_workers=_get(spec, "n_workers", "cluster", int, None),
                                   device_mode="gpu" if kind == "cuda" else None) as ctx:
            yield ctx
        return
    if kind == "address":
        with dr.DistributedContext(_get(spec, "address", "cluster", str),
                                   timeout=_get(spec, "timeout", "cluster", float, 30.0)) as ctx:
            yield ctx
        return
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError("cluster.kind = 'slurm' needs dask-jobqueue: pip install 'daskrecon[hpc]'") from None
        # A context given a cluster leaves it running: this one the config started, so it is closed here
        # (its jobs cancelled), whatever happens in the run.
        with SLURMCluster(**_get(spec, "slurm", "cluster", dict, {})) as cluster:
            cluster.scale(jobs=_get(spec, "jobs", "cluster", int, 1))
            with dr.DistributedContext(cluster, timeout=_get(spec, "timeout", "cluster", float, 600.0)) as ctx:
                yield ctx
        return
    raise ConfigError(f"cluster.kind must be local, cuda, slurm or address, got {kind!r}")


@dataclass
class CheckReport:
    """What ``--check`` measured: per operator task and tile (inputs read whole), or per iteration on
    a crop (``crop``: its shape; inputs too large to read whole), and the projected run."""

    seconds_per_operator_task: float | None
    seconds_per_tile: float | None
    projected_seconds: float
    worker_rss_mib: list[float]
    seconds_per_iteration: float | None = None
    crop: tuple[int, ...] | None = None


def run_config(path: str | Path, check: bool = False, echo: Any = print) -> Any:
    """Run (or, with ``check``, time one operator task and one tile of) the reconstruction in ``path``."""
    from deepinv.utils import TensorList

    import daskrecon as dr

    cfg = load_config(path)
    base = cfg["_base"]
    # Zarr inputs stay lazy (a volume larger than memory streams); other files are read whole.
    level = _get(cfg["input"], "level", "input", int, 0)
    ys = [read_lazy(_resolve(base, p), level) for p in cfg["input"]["measurements"]]
    truth = cfg["input"].get("ground_truth")
    x_true = read_lazy(_resolve(base, truth), level) if truth else None
    # --check reads the inputs whole when they are small enough, else times an iteration on a crop.
    streamed_check = check and any(isinstance(v, da.Array) and v.nbytes > CHECK_MAX_BYTES for v in [*ys, x_true])
    if check and not streamed_check:
        ys = [_eager(v) for v in ys]
        x_true = _eager(x_true) if x_true is not None else None
    lazy = any(not isinstance(v, torch.Tensor) for v in [*ys, x_true] if v is not None)
    shape = tuple((x_true if x_true is not None else ys[0]).shape)
    # (not for a check on a crop: a full-size Inpainting mask of a volume that large need not exist)
    ops = None if streamed_check else [build_operator(s, i, shape, base) for i, s in enumerate(cfg["operators"])]
    den = cfg.get("denoiser", {})
    out = cfg.get("output", {})
    out_path = _resolve(base, _get(out, "path", "output", str, "result.zarr"))
    overwrite = _get(out, "overwrite", "output", bool, False)
    if not overwrite and _fs(out_path)[0].exists(_fs(out_path)[1]):
        raise ConfigError(f"output {out_path!r} exists; set output.overwrite = true or choose another path")
    # a bad weight file, or one for other channels: before any cluster
    model = fit_channels(build_denoiser(den, base), shape, echo) if _uses_denoiser(cfg) else None
    with make_context(cfg.get("cluster", {})) as ctx:
        echo(f"cluster: {ctx.num_workers} workers, dashboard {ctx.dashboard_link}")
        dden = None if model is None else dr.distribute(
            # keys left out: None, the configured defaults (daskrecon.denoiser.* in dask.config), as in Python
            model, ctx, patch_size=_get(den, "patch_size", "denoiser", int, None),
            overlap=_get(den, "overlap", "denoiser", int, None), precision=_get(den, "precision", "denoiser", str, None),
            precision_tol=_get(den, "precision_tol", "denoiser", float, None))
        if streamed_check:
            return _check_streamed(ctx, cfg, ys, x_true, dden, echo)
        dphys = dr.distribute(ops, ctx)
        y = ys if lazy else TensorList(ys)
        # zeros when some measurement is not image-shaped (lazy inputs: the default Aᵀy / N, on the workers)
        x0 = torch.zeros(shape) if not lazy and any(tuple(y_.shape) != shape for y_ in ys) else None
        opts = options_from(cfg)
        if check:
            return _check(ctx, dphys, dden, y, shape, opts.n_iter, echo)
        x = dr.reconstruct(dphys, y, dden, x0=x0, x_true=x_true, **_keywords(opts))
        # inside the context: a lazy result reads chunks from the cluster (or its checkpoint) as it is written
        written = write_image(out_path, x if not isinstance(x, torch.Tensor) else x.cpu().numpy(),
                              overwrite=overwrite, ctx=ctx, ome=_ome_output(cfg, shape) if _is_ome_path(out_path) else None)
    echo(f"wrote {written}")
    if written != out_path:
        raise OutputExistsError(f"output {out_path!r} appeared during the run and output.overwrite = false: it was left "
                                f"as it is; the result was written to {written!r}")
    return x


def _ome_output(cfg: dict, shape: tuple[int, ...]) -> dict:
    """:func:`daskrecon.write_ome_zarr`'s keywords for the output: ``[output]``'s, and ``like=`` the first
    OME-Zarr input the size of the signal (the ground truth, else a measurement), whose axes, voxel
    size and units the result keeps."""
    base = cfg["_base"]
    level = _get(cfg["input"], "level", "input", int, 0)
    kw = _ome_options(cfg.get("output", {}))
    for p in [cfg["input"].get("ground_truth"), *cfg["input"]["measurements"]]:
        if p is None:
            continue
        path = _resolve(base, p)
        if _is_zarr(path) and is_ome_zarr(path):
            img = _open_ome(path, level)
            if tuple(img.data.shape) == tuple(shape):
                kw["like"] = img
                break
    return kw


def _uses_denoiser(cfg: dict) -> bool:
    """Every algorithm takes the ``[denoiser]`` (bundled by default), but ``sirt`` (no prior) and
    ``mlem``/``osem`` without a ``[denoiser]`` section (plain EM; with one, its one-step-late prior)."""
    rule = ALGORITHMS[options_from(cfg).algorithm]
    return not rule.prior_optional or ("denoiser" in cfg and rule.name != "sirt")


def options_from(cfg: dict) -> ReconstructOptions:
    """The reconstruction's options from ``[solver]`` and ``[checkpoint]``: what a key does not say takes
    :class:`~daskrecon.engine.options.ReconstructOptions`' default, the same as :func:`daskrecon.reconstruct`'s."""
    sol, ck, base = cfg.get("solver", {}), cfg.get("checkpoint", {}), cfg["_base"]
    d = ReconstructOptions.default
    try:
        return ReconstructOptions(
            algorithm=_get(sol, "algorithm", "solver", str, d("algorithm")),
            n_iter=_get(sol, "iterations", "solver", int, d("n_iter")),
            step_size=_get(sol, "step_size", "solver", (float, list), d("step_size")),
            sigma_denoiser=_get(sol, "sigma_denoiser", "solver", (float, list), d("sigma_denoiser")),
            red_weight=_get(sol, "red_weight", "solver", float, d("red_weight")),
            n_subsets=_get(sol, "n_subsets", "solver", int, d("n_subsets")),
            seed=_get(sol, "seed", "solver", int, d("seed")),
            cg_max_iter=_get(sol, "cg_max_iter", "solver", int, d("cg_max_iter")),
            cg_tol=_get(sol, "cg_tol", "solver", float, d("cg_tol")),
            prox_solver=_get(sol, "prox_solver", "solver", str, d("prox_solver")),
            tol=_get(sol, "tol", "solver", float, d("tol")),
            max_time=_get(sol, "max_time", "solver", float, d("max_time")),
            checkpoint=_resolve(base, _get(ck, "path", "checkpoint", str)) if "path" in ck else d("checkpoint"),
            scratch=_resolve(base, _get(ck, "scratch", "checkpoint", str)) if "scratch" in ck else d("scratch"),
            checkpoint_every=_get(ck, "every", "checkpoint", int, d("checkpoint_every")),
            resume=_get(ck, "resume", "checkpoint", bool, d("resume")),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def _keywords(opts: ReconstructOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def _eager(v: Any) -> torch.Tensor:
    """A small lazy input read whole (``--check`` times the whole-signal gradient on it)."""
    if isinstance(v, torch.Tensor):
        return v
    return torch.from_numpy(np.asarray(v.compute(scheduler="threads")))


def crop_shape(shape: tuple[int, ...], chunk: tuple[int, ...], n_workers: int) -> tuple[int, ...]:
    """The spatial crop ``--check`` times an iteration on: whole chunks of the run's plan (``chunk``
    per spatial axis), one per axis, then more along the axis with the fewest until every worker
    has two (or the crop is the whole signal)."""
    spatial = shape[2:]
    count = [1] * len(spatial)

    def side(a: int) -> int:
        return min(spatial[a], count[a] * chunk[a])

    while math.prod(-(-side(a) // chunk[a]) for a in range(len(spatial))) < 2 * n_workers:
        growable = [a for a in range(len(spatial)) if side(a) < spatial[a]]
        if not growable:
            break
        count[min(growable, key=lambda a: (count[a], -a))] += 1
    return tuple(side(a) for a in range(len(spatial)))


def _check_streamed(ctx: Any, cfg: dict, ys: list, x_true: Any, dden: Any, echo: Any) -> CheckReport:
    """``--check`` on inputs too large to read whole: two iterations of the configured algorithm, out of
    core (``storage="zarr"``, as the run streams), on a crop of the signal; the second is timed and
    scaled by the number of pixels. The inputs are sliced lazily (only the crop is read) and the
    operators are built for the crop (a mask file cropped)."""
    import daskrecon as dr

    base = cfg["_base"]
    specs = cfg["operators"]
    shape = tuple((x_true if x_true is not None else ys[0]).shape)
    factors = [_get(s, "factor", f"operators[{i}]", int, 2) if s["type"] == "downsampling" else 1
               for i, s in enumerate(specs)]
    # The run's own chunks (they depend on the operators' forms, not on the size of their masks).
    probe_shape = (*shape[:2], *(min(n, 4 * math.lcm(*factors)) for n in shape[2:]))
    probe = [build_operator(s, i, probe_shape, base, tuple(slice(0, n) for n in probe_shape[2:]))
             for i, s in enumerate(specs)]
    forms = [f for f in map(local_form, probe) if f is not None]
    chunks = iterate_chunks(dden, shape, np.dtype(np.float32), forms)
    chunk = tuple(c[0] for c in chunks[2:])
    crop = crop_shape(shape, chunk, ctx.num_workers)
    region = tuple(slice(0, c) for c in crop)
    ops = [build_operator(s, i, (*shape[:2], *crop), base, region) for i, s in enumerate(specs)]
    y_crop = [_lazy(y)[(slice(None), slice(None), *(slice(0, c // f) for c in crop))] for y, f in zip(ys, factors)]
    truth = _lazy(x_true)[(slice(None), slice(None), *region)] if x_true is not None else None
    stamps: list[float] = []
    scratch = options_from(cfg).scratch
    # A new folder under the run's scratch location (a path or a URL), checked to be shared like the run's;
    # removed after.
    from daskrecon.engine.checkpoint import Checkpoint

    store = Checkpoint.temporary(ctx, scratch, prefix="daskrecon-check-",
                                 why="--check runs two out-of-core iterations there")
    try:
        crop_run = options_from(cfg).replace(n_iter=2, storage="zarr", chunks=chunk, checkpoint=store.url,
                                             resume=False, checkpoint_every=1, progress=False)
        dr.reconstruct(dr.distribute(ops, ctx), y_crop, dden, x_true=truth,
                       callback=lambda k, x: stamps.append(time.perf_counter()), **_keywords(crop_run))
    finally:
        store.remove()
    per_it_crop = stamps[1] - stamps[0]  # the second iteration: the first includes the start
    per_it = per_it_crop * math.prod(shape[2:]) / math.prod(crop)
    iterations = options_from(cfg).n_iter
    client = ctx.client
    rss = sorted(v / 2**20 for v in bounded(client, client._run, _worker_rss, what="reading the workers' memory",
                                            timeout=ctx.stall_timeout).values())
    report = CheckReport(None, None, per_it * iterations, rss, seconds_per_iteration=per_it, crop=crop)
    echo(f"inputs too large to read whole (> {CHECK_MAX_BYTES / 2**30:.0f} GiB): one out-of-core iteration on a "
         f"{'×'.join(map(str, crop))} crop of {'×'.join(map(str, shape[2:]))}: {per_it_crop:.3f} s; "
         f"worker RSS {', '.join(f'{r:.0f}' for r in rss)} MiB")
    echo(f"projected: {per_it:.2f} s per iteration, {report.projected_seconds:.0f} s for {iterations} iterations "
         "(the crop's throughput per pixel, which holds while every worker has tiles to run)")
    return report


def _lazy(v: Any) -> da.Array:
    return v if isinstance(v, da.Array) else da.from_array(as_numpy(v))


def _check(ctx: Any, dphys: Any, dden: Any, y: Any, shape: tuple, iterations: int, echo: Any) -> CheckReport:
    """One operator task and one tile, timed on the cluster, and the projected total."""
    from deepinv.optim import L2

    import daskrecon as dr

    x = torch.zeros(shape)
    f = dr.distribute(L2(), ctx)
    f.grad(x, y, dphys)  # places y, builds operators
    t0 = time.perf_counter()
    f.grad(x, y, dphys)
    t_grad = time.perf_counter() - t0
    t_tile, n_tiles = 0.0, 0
    if dden is not None:  # EM and SIRT without a prior have no tiles
        strategy = dden.strategy_for(shape)
        one = strategy.tiles[0].window() if hasattr(strategy, "tiles") else None
        tile = x[(slice(None), slice(None), *one)] if one else x
        dden(tile.contiguous())
        t0 = time.perf_counter()
        dden(tile.contiguous())
        t_tile = time.perf_counter() - t0
        n_tiles = strategy.get_num_patches()
    client = ctx.client
    rss = sorted(v / 2**20 for v in bounded(client, client._run, _worker_rss, what="reading the workers' memory",
                                            timeout=ctx.stall_timeout).values())
    per_it = t_grad + t_tile * n_tiles / max(1, ctx.num_workers)
    report = CheckReport(t_grad / dphys.num_operators * ctx.num_workers, t_tile, per_it * iterations, rss)
    echo(f"one gradient ({dphys.num_operators} operator tasks): {t_grad:.3f} s; one tile: {t_tile:.3f} s "
         f"({n_tiles} tiles); worker RSS {', '.join(f'{r:.0f}' for r in rss)} MiB")
    echo(f"projected: {per_it:.2f} s per iteration, {report.projected_seconds:.0f} s for {iterations} iterations")
    return report


def _worker_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss
