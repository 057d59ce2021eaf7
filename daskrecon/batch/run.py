"""``daskrecon reconstruct CONFIG``: read the inputs, build the objects, run on the cluster, write the result."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import torch

from daskrecon.batch.build import build_denoiser, build_operator, fit_channels, make_context
from daskrecon.batch.check import CHECK_MAX_BYTES, check_streamed, check_whole, eager
from daskrecon.batch.files import filesystem, is_ome_path, is_zarr, open_ome, read_lazy, resolve, write_image
from daskrecon.config import (
    OutputExistsError,
    keywords,
    load_config,
    ome_options,
    options_from,
    read_key,
    uses_denoiser,
)
from daskrecon.errors import ClusterConnectionError, ConfigError
from daskrecon.frontend.omezarr import is_ome_zarr

__all__ = ["interrupted_message", "run_config"]


@contextlib.contextmanager
def _reaching(scheduler: str | None, cluster: dict) -> Iterator[None]:
    """A scheduler that does not answer, said in the command's words (the context's speak Python's)."""
    try:
        yield
    except ClusterConnectionError as exc:
        if exc.unreachable is None or not (scheduler or cluster.get("kind") == "address"):
            raise
        address, why = exc.unreachable
        where = "--scheduler" if scheduler else "cluster.address"
        other = ("leave out --scheduler to use the config's [cluster]" if scheduler else
                 "set cluster.kind = \"local\" for a cluster on this machine")
        raise ClusterConnectionError(f"could not reach the Dask scheduler at {address!r} {why}. Check {where} and "
                                     f"that the scheduler is running, or {other}") from exc.__cause__


def run_config(path: str | Path, check: bool = False, echo: Any = print, scheduler: str | None = None) -> Any:
    """Run (or, with ``check``, time one operator task and one tile of) the reconstruction in ``path``.

    ``scheduler``: the address of a running Dask scheduler to run on instead of the config's
    ``[cluster]`` (the same file on a laptop and on a cluster started apart, e.g. by dask-jobqueue).

    Returns the result (with ``check``: the :class:`~daskrecon.batch.check.CheckReport`). An out-of-core
    run without ``checkpoint.path`` keeps its iterate in a temporary folder under the scratch location;
    once the result is written that folder is removed and the result returned is read from the output.
    """
    from deepinv.utils import TensorList

    import daskrecon as dr

    cfg = load_config(path)
    base = cfg["_base"]
    # Zarr inputs stay lazy (a volume larger than memory streams); other files are read whole.
    level = read_key(cfg["input"], "level", "input", int, 0)
    ys = [read_lazy(resolve(base, p), level) for p in cfg["input"]["measurements"]]
    truth = cfg["input"].get("ground_truth")
    x_true = read_lazy(resolve(base, truth), level) if truth else None
    # --check reads the inputs whole when they are small enough, else times an iteration on a crop.
    streamed_check = check and any(isinstance(v, da.Array) and v.nbytes > CHECK_MAX_BYTES for v in [*ys, x_true])
    if check and not streamed_check:
        ys = [eager(v) for v in ys]
        x_true = eager(x_true) if x_true is not None else None
    lazy = any(not isinstance(v, torch.Tensor) for v in [*ys, x_true] if v is not None)
    shape = tuple((x_true if x_true is not None else ys[0]).shape)
    # (not for a check on a crop: a full-size Inpainting mask of a volume that large need not exist)
    ops = None if streamed_check else [build_operator(s, i, shape, base) for i, s in enumerate(cfg["operators"])]
    den = cfg.get("denoiser", {})
    out = cfg.get("output", {})
    out_path = resolve(base, read_key(out, "path", "output", str, "result.zarr"))
    overwrite = read_key(out, "overwrite", "output", bool, False)
    if not check and not overwrite and filesystem(out_path)[0].exists(filesystem(out_path)[1]):  # --check writes none
        raise ConfigError(f"output {out_path!r} exists; set output.overwrite = true or choose another path")
    # a bad weight file, or one for other channels: before any cluster
    model = fit_channels(build_denoiser(den, base), shape, echo) if uses_denoiser(cfg) else None
    cluster = {"kind": "address", "address": scheduler} if scheduler else cfg.get("cluster", {})
    with _reaching(scheduler, cluster), make_context(cluster) as ctx:
        echo(f"cluster: {ctx.num_workers} workers, dashboard {ctx.dashboard_link}")
        dden = None if model is None else dr.distribute(
            # keys left out: None, the configured defaults (daskrecon.denoiser.* in dask.config), as in Python
            model, ctx, patch_size=read_key(den, "patch_size", "denoiser", int, None),
            overlap=read_key(den, "overlap", "denoiser", int, None), precision=read_key(den, "precision", "denoiser", str, None),
            precision_tol=read_key(den, "precision_tol", "denoiser", float, None))
        if streamed_check:
            return check_streamed(ctx, cfg, ys, x_true, dden, echo)
        dphys = dr.distribute(ops, ctx)
        y = ys if lazy else TensorList(ys)
        # zeros when some measurement is not image-shaped (lazy inputs: the default Aᵀy / N, on the workers)
        x0 = torch.zeros(shape) if not lazy and any(tuple(y_.shape) != shape for y_ in ys) else None
        opts = options_from(cfg)
        if check:
            return check_whole(ctx, dphys, dden, y, shape, opts.n_iter, echo)
        with warnings.catch_warnings():  # its scratch folder is removed below, once the result is written
            warnings.filterwarnings("ignore", message="no checkpoint given", category=UserWarning)
            x = dr.reconstruct(dphys, y, dden, x0=x0, x_true=x_true, **keywords(opts))
        # inside the context: a lazy result reads chunks from the cluster (or its checkpoint) as it is written
        written = write_image(out_path, x if not isinstance(x, torch.Tensor) else x.cpu().numpy(),
                              overwrite=overwrite, ctx=ctx, ome=_ome_output(cfg, shape) if is_ome_path(out_path) else None)
    echo(f"wrote {written}")
    if isinstance(x, da.Array) and opts.checkpoint is None:
        for folder in _remove_scratch(x):
            echo(f"removed the run's scratch folder {folder}")
        x = read_lazy(written) if not is_ome_path(written) else open_ome(written, 0).data
    if written != out_path:
        raise OutputExistsError(f"output {out_path!r} appeared during the run and output.overwrite = false: it was left "
                                f"as it is; the result was written to {written!r}")
    return x


def _remove_scratch(x: da.Array) -> list[str]:
    """Remove the temporary checkpoint folders an out-of-core result ``x`` reads from (made by the run
    because the config names no checkpoint): each only if all of it is daskrecon's. The ones removed."""
    import posixpath

    from daskrecon.engine.checkpoint import Checkpoint
    from daskrecon.runtime.storage import zarr_sources

    removed = []
    for src in zarr_sources(x):
        folder = src
        for _ in range(3):  # the slot array sits in the folder (x.zarr), or one level further in it
            folder = posixpath.dirname(folder.rstrip("/"))
            store = Checkpoint(folder)
            if posixpath.basename(folder).startswith("daskrecon-") and store.exists():
                store.remove()  # nothing happens to a folder with anything in it that daskrecon did not make
                if not store.fs.exists(store.folder.root):
                    removed.append(folder)
                break
    return removed


def _ome_output(cfg: dict, shape: tuple[int, ...]) -> dict:
    """:func:`daskrecon.write_ome_zarr`'s keywords for the output: ``[output]``'s, and ``like=`` the first
    OME-Zarr input the size of the signal (the ground truth, else a measurement), whose axes, voxel
    size and units the result keeps."""
    base = cfg["_base"]
    level = read_key(cfg["input"], "level", "input", int, 0)
    kw = ome_options(cfg.get("output", {}))
    for p in [cfg["input"].get("ground_truth"), *cfg["input"]["measurements"]]:
        if p is None:
            continue
        path = resolve(base, p)
        if is_zarr(path) and is_ome_zarr(path):
            img = open_ome(path, level)
            if tuple(img.data.shape) == tuple(shape):
                kw["like"] = img
                break
    return kw


def interrupted_message(path: str | Path) -> str:
    """What to tell the user after a run of config ``path`` was interrupted (Ctrl-C): where it can go on."""
    try:
        cfg = load_config(path, check_existing=False)  # the checkpoint it left is there now
    except ConfigError:
        cfg = None
    ck = (cfg or {}).get("checkpoint", {})
    if "path" not in ck:
        return "interrupted: nothing was written (no checkpoint.path: a run with one can be continued)"
    from daskrecon.engine.checkpoint import Checkpoint

    store = Checkpoint(resolve(cfg["_base"], ck["path"]))
    if not store.exists():
        return f"interrupted before the first checkpoint in {ck['path']!r}: run the config again"
    done = store.meta()["iteration"]
    return (f"interrupted: {ck['path']!r} holds iteration {done}; run the same config with checkpoint.resume = true "
            f"to continue from there")
