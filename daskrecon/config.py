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
    path = "result.zarr"                       # .zarr, .npy (any signal), .tif (an image or volume, float32, ImageJ
                                               # axes), .png (an 8-bit view: 1 or 3 channels, clipped to [0, 1]),
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
    resume = true                              # continue the checkpoint there (else one there is refused)
    overwrite = false                          # or start over: replaces only what daskrecon wrote there
    scratch = "/shared/tmp"                    # where out-of-core runs without a path keep their iterate
                                               # (default: the driver's temporary directory)

    [cluster]
    kind = "local"                             # local | cuda | slurm | address
    n_workers = 2                              # local / cuda
    address = "tcp://host:8786"                # address
    jobs = 4                                   # slurm: SLURMCluster(**[cluster.slurm]).scale(jobs=...)
                                               # (`daskrecon reconstruct run.toml --scheduler ADDRESS` runs
                                               # on a running scheduler instead of [cluster])

Paths are taken relative to the config's folder; a URL (``s3://…``, ``file://…``, anything with
``://``) is used as it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from daskrecon import errors
from daskrecon.batch.files import input_shape, is_ome_path, resolve, suffix_of
from daskrecon.engine.algorithms import ALGORITHMS
from daskrecon.engine.options import SUBSET_ALGORITHMS, ReconstructOptions
from daskrecon.errors import ConfigError
from daskrecon.planning.precision import check_precision
from daskrecon.runtime.defaults import pick
from daskrecon.runtime.storage import location, relation

__all__ = ["ConfigError", "OutputExistsError", "load_config", "options_from"]

#: Names that moved into :mod:`daskrecon.batch` (one capability per module); still importable from here.
_MOVED = {
    "run_config": "daskrecon.batch.run",
    **dict.fromkeys(["read_image", "read_lazy", "write_image", "input_shape"], "daskrecon.batch.files"),
    **dict.fromkeys(["build_operator", "build_denoiser", "fit_channels", "make_context"], "daskrecon.batch.build"),
    **dict.fromkeys(["CheckReport", "crop_shape", "CHECK_MAX_BYTES"], "daskrecon.batch.check"),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # imported on use: daskrecon.batch imports this module
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_SECTIONS = {"input", "operators", "denoiser", "solver", "output", "checkpoint", "cluster"}


_OPERATORS = {"blur", "downsampling", "inpainting", "denoising"}


_KEYS = {
    "input": {"measurements", "ground_truth", "level"},
    "operators": {"type", "sigma", "angle", "padding", "factor", "filter", "mask"},
    "denoiser": {"weights", "architecture", "patch_size", "overlap", "precision", "precision_tol"},
    "solver": {"algorithm", "iterations", "step_size", "sigma_denoiser", "red_weight", "tol", "max_time", "n_subsets",
               "seed", "cg_max_iter", "cg_tol", "prox_solver"},
    "output": {"path", "overwrite", "ngff", "levels", "voxel_size", "units"},
    "checkpoint": {"path", "every", "resume", "overwrite", "scratch"},
    "cluster": {"kind", "n_workers", "address", "timeout", "jobs", "slurm"},
}


class OutputExistsError(ConfigError, errors.OutputExistsError):
    """The output path was taken while the run went on (``output.overwrite = false``): the result went next to it."""


def read_key(d: dict, key: str, where: str, kind: type | tuple, default: Any = ...) -> Any:
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


def load_config(path: str | Path, *, check_existing: bool = True) -> dict:
    """Read and check a TOML/YAML config; relative paths are taken from its folder.

    ``check_existing``: also refuse a checkpoint folder that holds a checkpoint the config neither
    continues nor starts over (what a run needs; not what reading the config back afterwards does)."""
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
    inp = read_key(cfg, "input", "config", dict)
    meas = read_key(inp, "measurements", "input", list)
    ops = read_key(cfg, "operators", "config", list)
    if len(ops) != len(meas):
        raise ConfigError(f"{len(ops)} [[operators]] for {len(meas)} input.measurements: give one operator per measurement")
    for i, op in enumerate(ops):
        t = read_key(op, "type", f"operators[{i}]", str)
        if t not in _OPERATORS:
            raise ConfigError(f"operators[{i}].type must be one of {sorted(_OPERATORS)}, got {t!r}")
    algorithm = cfg.get("solver", {}).get("algorithm", "pnp")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"solver.algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    n_subsets = read_key(cfg.get("solver", {}), "n_subsets", "solver", int, None)
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
        check_precision(pick(read_key(den, "precision", "denoiser", str, None), "denoiser.precision"),
                        read_key(den, "precision_tol", "denoiser", float, None))
    except ValueError as exc:
        raise ConfigError(f"denoiser: {exc}") from None
    prox_solver = read_key(cfg.get("solver", {}), "prox_solver", "solver", str, "auto")
    if prox_solver not in ("auto", "cg", "fourier"):
        raise ConfigError(f"solver.prox_solver must be 'auto', 'cg' or 'fourier', got {prox_solver!r}")
    _check_output(cfg, base)
    _check_apart(cfg, base)
    if check_existing:
        _check_checkpoint(cfg, base)
    cfg["_base"] = base
    return cfg


def _check_checkpoint(cfg: dict, base: Path) -> None:
    """A checkpoint folder that holds a checkpoint is continued or started over only when the config says which."""
    ck = cfg.get("checkpoint", {})
    resume = read_key(ck, "resume", "checkpoint", bool, False)
    overwrite = read_key(ck, "overwrite", "checkpoint", bool, False)
    if resume and overwrite:
        raise ConfigError("checkpoint.resume and checkpoint.overwrite are both true: resume continues the checkpoint, "
                          "overwrite starts over; set one")
    if "path" not in ck or resume or overwrite:
        return
    from daskrecon.engine.checkpoint import Checkpoint

    store = Checkpoint(resolve(base, read_key(ck, "path", "checkpoint", str)))
    if store.exists():
        raise ConfigError(f"checkpoint.path {ck['path']!r} already holds a checkpoint (iteration "
                          f"{store.meta()['iteration']}): set checkpoint.resume = true to continue it, or "
                          f"checkpoint.overwrite = true to start over")


def _location(base: Path, p: str) -> str:
    """Where ``p`` points, comparable with another location: symlinks resolved for local paths."""
    return location(resolve(base, p))


def _check_apart(cfg: dict, base: Path) -> None:
    """The output and the checkpoint never write over an input, nor the output over the checkpoint.

    Writing the result replaces what is at ``output.path`` (with ``overwrite``) while the run may still
    read from its inputs and its checkpoint: the same location, or one inside the other, would destroy
    the user's data, whatever ``overwrite`` says.
    """
    inp = cfg["input"]
    inputs = [(f"input.measurements[{i}]", p) for i, p in enumerate(inp["measurements"])]
    if inp.get("ground_truth") is not None:
        inputs.append(("input.ground_truth", read_key(inp, "ground_truth", "input", str)))
    out = read_key(cfg.get("output", {}), "path", "output", str, "result.zarr")
    ckpt = read_key(cfg.get("checkpoint", {}), "path", "checkpoint", str, None)
    here = _location(base, out)
    for name, p in inputs:
        rel = relation(here, _location(base, p))
        if rel:
            raise ConfigError(f"output.path {out!r} {rel} {name} {p!r}: writing the result there would destroy that "
                              f"input; choose another output path")
    if ckpt is None:
        return
    there = _location(base, ckpt)
    rel = relation(here, there)
    if rel in ("is", "holds"):
        raise ConfigError(f"output.path {out!r} {rel} checkpoint.path {ckpt!r}: the result is streamed from the "
                          f"checkpoint while it is written, and writing it there would destroy both; choose another "
                          f"output path")
    for name, p in inputs:
        # a checkpoint folder that holds the inputs is fine: daskrecon touches only the arrays it made there
        rel = relation(there, _location(base, p))
        if rel in ("is", "lies inside"):
            raise ConfigError(f"checkpoint.path {ckpt!r} {rel} {name} {p!r}: the checkpoint's arrays would be written "
                              f"into that input; choose another checkpoint folder")


#: Output formats: what each can hold.
OUTPUT_FORMATS = {".zarr": "any signal", ".npy": "any signal",
                  ".png": "an 8-bit view of an image of 1 or 3 channels (clipped to [0, 1])",
                  ".tif": "an image or volume, float32 (ImageJ hyperstack)",
                  ".tiff": "an image or volume, float32 (ImageJ hyperstack)"}


def _check_output(cfg: dict, base: Path) -> None:
    """The output's format against the problem's dimensions, before anything runs."""
    out = cfg.get("output", {})
    path = read_key(out, "path", "output", str, "result.zarr")
    read_key(out, "overwrite", "output", bool, False)
    suffix = suffix_of(path)
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"output.path {path!r} must end in one of {', '.join(OUTPUT_FORMATS)} (the format to write); "
                          f"e.g. {path.rstrip('/') + '.zarr'!r}")
    inp = cfg["input"]
    level = read_key(inp, "level", "input", int, 0)
    ome_keys = sorted(k for k in ("ngff", "levels", "voxel_size", "units") if k in out)
    if not is_ome_path(path):
        if ome_keys:
            raise ConfigError(f"output {ome_keys} apply to an OME-Zarr output: name it *.ome.zarr, or remove them")
    else:
        ome_options(out)
    if suffix in (".zarr", ".npy"):
        return
    source = inp.get("ground_truth") or inp["measurements"][0]
    shape = input_shape(resolve(base, source), level)
    if shape[0] != 1:
        raise ConfigError(f"output.path {path!r}: a {suffix} file holds one image or volume, and this problem's "
                          f"signal has a batch of {shape[0]} {shape}; write it to .zarr or .npy")
    if suffix in (".tif", ".tiff"):
        return
    if len(shape) == 5:
        raise ConfigError(f"output.path {path!r}: a {suffix} file holds a 2-D image, and this problem's signal is a "
                          f"volume {shape}; write it to .tif (float32), .zarr or .npy")
    if shape[1] not in (1, 3):
        raise ConfigError(f"output.path {path!r}: a {suffix} file holds 1 or 3 channels, and this problem's signal has "
                          f"{shape[1]}; write it to .tif (float32), .zarr or .npy")


def ome_options(out: dict) -> dict:
    """``[output]``'s OME-Zarr keys as :func:`daskrecon.write_ome_zarr`'s keywords, checked."""
    from daskrecon.frontend.omezarr import VERSIONS

    version = read_key(out, "ngff", "output", str, "0.4")
    if version not in VERSIONS:
        raise ConfigError(f"output.ngff must be one of {list(VERSIONS)}, got {version!r}")
    levels = read_key(out, "levels", "output", int, None)
    if levels is not None and levels < 1:
        raise ConfigError(f"output.levels must be at least 1 (the full-resolution level), got {levels}")
    voxel = read_key(out, "voxel_size", "output", (list, float, int), None)
    if voxel is not None and any(not isinstance(v, int | float) or v <= 0 for v in np.atleast_1d(voxel).tolist()):
        raise ConfigError(f"output.voxel_size must be positive numbers ([D,] H, W order), got {voxel!r}")
    units = read_key(out, "units", "output", str, None)
    return dict(version=version, levels=levels, voxel_size=voxel, units=units)


def uses_denoiser(cfg: dict) -> bool:
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
            algorithm=read_key(sol, "algorithm", "solver", str, d("algorithm")),
            n_iter=read_key(sol, "iterations", "solver", int, d("n_iter")),
            step_size=read_key(sol, "step_size", "solver", (float, list), d("step_size")),
            sigma_denoiser=read_key(sol, "sigma_denoiser", "solver", (float, list), d("sigma_denoiser")),
            red_weight=read_key(sol, "red_weight", "solver", float, d("red_weight")),
            n_subsets=read_key(sol, "n_subsets", "solver", int, d("n_subsets")),
            seed=read_key(sol, "seed", "solver", int, d("seed")),
            cg_max_iter=read_key(sol, "cg_max_iter", "solver", int, d("cg_max_iter")),
            cg_tol=read_key(sol, "cg_tol", "solver", float, d("cg_tol")),
            prox_solver=read_key(sol, "prox_solver", "solver", str, d("prox_solver")),
            tol=read_key(sol, "tol", "solver", float, d("tol")),
            max_time=read_key(sol, "max_time", "solver", float, d("max_time")),
            checkpoint=resolve(base, read_key(ck, "path", "checkpoint", str)) if "path" in ck else d("checkpoint"),
            scratch=resolve(base, read_key(ck, "scratch", "checkpoint", str)) if "scratch" in ck else d("scratch"),
            checkpoint_every=read_key(ck, "every", "checkpoint", int, d("checkpoint_every")),
            resume=read_key(ck, "resume", "checkpoint", bool, d("resume")),
            overwrite=read_key(ck, "overwrite", "checkpoint", bool, d("overwrite")),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def keywords(opts: ReconstructOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
