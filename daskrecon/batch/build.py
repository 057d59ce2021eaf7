"""Deepinv objects and the cluster from a config's tables: ``[[operators]]``, ``[denoiser]``, ``[cluster]``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from daskrecon.batch.files import read_image, resolve
from daskrecon.config import read_key
from daskrecon.errors import ConfigError

__all__ = ["build_denoiser", "build_operator", "fit_channels", "make_context"]


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
        sigma = read_key(spec, "sigma", where, (list, float), [1.0] * (3 if volume else 2))
        sigma = tuple(float(v) for v in sigma) if isinstance(sigma, list) else (sigma,) * (3 if volume else 2)
        if len(sigma) != len(shape) - 2:
            raise ConfigError(f"{where}.sigma needs {len(shape) - 2} values for a {len(shape) - 2}-D signal of shape "
                              f"{shape}, got {list(sigma)}")
        if volume:
            from deepinv.physics.functional import gaussian_blur as gaussian_nd

            if read_key(spec, "angle", where, float, 0.0):
                raise ConfigError(f"{where}.angle applies to 2-D blurs only; remove it for a volume")
            kernel = gaussian_nd(psf_size=None, sigma=sigma)
        else:
            kernel = gaussian_blur(sigma=sigma, angle=read_key(spec, "angle", where, float, 0.0))
        return dinv.physics.Blur(filter=kernel, padding=read_key(spec, "padding", where, str, "circular"))
    if t == "downsampling":
        return dinv.physics.Downsampling(img_size=shape[1:], factor=read_key(spec, "factor", where, int, 2),
                                         filter=read_key(spec, "filter", where, str, "gaussian"),
                                         padding=read_key(spec, "padding", where, str, "circular"))
    if t == "inpainting":
        mask = read_key(spec, "mask", where, (str, float), 0.5)
        if isinstance(mask, str):
            mask = torch.from_numpy(read_image(resolve(base, mask) if base is not None else Path(mask))[0]) > 0.5
            if region is not None:
                mask = mask[(slice(None), *region)]
        return dinv.physics.Inpainting(img_size=shape[1:], mask=mask, rng=torch.Generator().manual_seed(i))
    return dinv.physics.Denoising()


def build_denoiser(spec: dict, base: Path) -> torch.nn.Module:
    from daskrecon.models import ARCHITECTURES, bundled_denoiser, bundled_denoiser_3d, bundled_drunet, load_network

    weights = read_key(spec, "weights", "denoiser", str, "bundled")
    bundled = {"bundled": bundled_denoiser, "bundled-drunet": bundled_drunet, "bundled-3d": bundled_denoiser_3d}
    if weights in bundled:
        return bundled[weights]()
    arch = read_key(spec, "architecture", "denoiser", str, None)
    if arch is not None and arch not in ARCHITECTURES:
        raise ConfigError(f"denoiser.architecture must be one of {list(ARCHITECTURES)}, got {arch!r}")
    path = resolve(base, weights)
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

    kind = read_key(spec, "kind", "cluster", str, "local")
    if kind in ("local", "cuda"):
        with dr.DistributedContext(n_workers=read_key(spec, "n_workers", "cluster", int, None),
                                   device_mode="gpu" if kind == "cuda" else None) as ctx:
            yield ctx
        return
    if kind == "address":
        with dr.DistributedContext(read_key(spec, "address", "cluster", str),  # no timeout: daskrecon.context.timeout
                                   timeout=read_key(spec, "timeout", "cluster", float, None)) as ctx:
            yield ctx
        return
    if kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError("cluster.kind = 'slurm' needs dask-jobqueue: pip install 'daskrecon[hpc]'") from None
        # A context given a cluster leaves it running: this one the config started, so it is closed here
        # (its jobs cancelled), whatever happens in the run.
        with SLURMCluster(**read_key(spec, "slurm", "cluster", dict, {})) as cluster:
            cluster.scale(jobs=read_key(spec, "jobs", "cluster", int, 1))
            with dr.DistributedContext(cluster, timeout=read_key(spec, "timeout", "cluster", float, 600.0)) as ctx:
                yield ctx
        return
    raise ConfigError(f"cluster.kind must be local, cuda, slurm or address, got {kind!r}")
