"""The ``daskrecon`` command."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Optional

import typer

from daskrecon.batch.run import interrupted_message, run_config
from daskrecon.demo import DEMO_DENOISERS, MIN_SIZE, run_demo
from daskrecon.errors import ClusterConnectionError, ConfigError, DaskreconError, OutputExistsError
from daskrecon.frontend.context import DistributedContext
from daskrecon.planning.precision import PRECISIONS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DeepInverse reconstructions on Dask clusters.")


@contextlib.contextmanager
def _quiet_on_interrupt() -> Iterator[None]:
    """On Ctrl-C, silence the in-process scheduler's and asyncio's logs before the cluster closes.

    A cluster closed mid-operation (e.g. a model being broadcast to the workers) makes the scheduler log
    each failed send and asyncio each task whose exception nobody awaits: dozens of tracebacks after
    "interrupted". The command ends there, so nothing needs them back; the previous handler returns
    when the command ends (a caller in another thread keeps Python's).

    Python runs the handler at the main thread's next bytecode, which may be inside a garbage-collector
    callback (distributed installs one), a ``__del__`` or a weakref callback: there the
    ``KeyboardInterrupt`` is printed as "Exception ignored" and dropped, and the command ran on to its
    end as if no Ctrl-C had come. Such a dropped interrupt is caught by ``sys.unraisablehook`` and
    delivered again from a timer, so that it lands in ordinary code.
    """
    redelivery: list[threading.Timer] = []

    def interrupt(signum, frame):
        redelivery.clear()
        # distributed gives some loggers a level and a handler of their own (distributed.client: a
        # reconnect cancelled by the closing client logs an ERROR with its traceback): each one, not the parent
        names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("distributed", "asyncio", "tornado")]
        for name in ("distributed", "asyncio", "tornado", *names):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        raise KeyboardInterrupt

    def redeliver(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # not from here: the hook runs inside the code that dropped it, which would drop it again
            timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
            timer.daemon = True
            redelivery[:] = [timer]
            timer.start()
        else:
            previous_hook(unraisable)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, interrupt)
    previous_hook, sys.unraisablehook = sys.unraisablehook, redeliver
    try:
        yield
        if redelivery:  # the work ended before the dropped interrupt came back: it still ends the command
            redelivery[0].cancel()
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


@app.command()
def demo(
    size: int = typer.Option(512, min=MIN_SIZE, help="Image side in pixels (512: the bundled image's own size)."),
    iterations: Optional[int] = typer.Option(None, min=1, help="Iterations (default: 5 of ADMM with the DRUNet, 30 of RED "
                                                           "with the DnCNN)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Local workers (default: sized to the machine)."),
    output: str = typer.Option("daskrecon-demo", help="Output directory."),
    denoiser: str = typer.Option("drunet", help="Bundled denoiser: drunet (the demo's) or dncnn (smaller, exact tiling)."),
    equivariant: bool = typer.Option(True, help="DRUNet: average it over the 8 flips and 90° rotations (8x the "
                                                 "denoiser's cost, +0.2 dB)."),
    precision: Optional[str] = typer.Option(None, help="The denoiser's tiles: fp32, bf16, fp16 or auto (default: bf16 "
                                                        "where this CPU runs it natively, else fp32; the error is "
                                                        "probed against fp32 first)."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Deblur a bundled image from 3 blurred, noisy views with the bundled denoiser (no input needed)."""
    if denoiser not in DEMO_DENOISERS:
        raise typer.BadParameter(f"{denoiser!r} is not a bundled denoiser: choose {' or '.join(DEMO_DENOISERS)}",
                                 param_hint="--denoiser")
    if precision is not None and precision not in PRECISIONS:
        raise typer.BadParameter(f"{precision!r} is not a precision: choose {', '.join(PRECISIONS)}",
                                 param_hint="--precision")
    try:
        with _quiet_on_interrupt():
            run_demo(size=size, iterations=iterations, n_workers=workers, output=output, denoiser=denoiser,
                     equivariant=equivariant, precision=precision, progress=progress, echo=typer.echo)
    except OutputExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    except DaskreconError as exc:
        typer.echo(f"error ({type(exc).__name__}): {exc}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)


@app.command()
def reconstruct(
    config: str = typer.Argument(..., help="A TOML or YAML file (see `python -c 'import daskrecon.config as c; print(c.__doc__)'`)."),
    check: bool = typer.Option(False, "--check", help="Time one operator task and one tile (inputs over 2 GiB: one out-of-core iteration on a crop of whole chunks), project the total, and stop."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Run on the Dask scheduler at this address (e.g. tcp://host:8786) instead of the config's cluster.address."),
) -> None:
    """Run the reconstruction described by CONFIG."""
    try:
        with _quiet_on_interrupt():
            run_config(config, check=check, echo=typer.echo, scheduler=scheduler)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2)
    except DaskreconError as exc:  # errors are API: their message says what happened and what to do
        typer.echo(f"error ({type(exc).__name__}): {exc}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo(interrupted_message(config), err=True)
        raise typer.Exit(130)


@app.command()
def info(scheduler: Optional[str] = typer.Option(None, help="Also check that this scheduler answers."),
         timeout: float = typer.Option(10.0, min=0.1, help="Seconds to wait for the scheduler's answer.")) -> None:
    """Versions, GPUs and (optionally) whether a scheduler is reachable."""
    import platform

    import dask
    import deepinv
    import distributed
    import torch
    import zarr

    import daskrecon

    typer.echo(f"daskrecon {daskrecon.__version__}  python {platform.python_version()}")
    typer.echo(f"torch {torch.__version__}  deepinv {deepinv.__version__}  dask {dask.__version__}  "
               f"distributed {distributed.__version__}  zarr {zarr.__version__}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    typer.echo(f"GPUs: {n}" + "".join(f"\n  cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n)))
    for extra in ("dask_cuda", "dask_jobqueue", "bokeh"):
        try:
            mod = __import__(extra)
            typer.echo(f"{extra}: {getattr(mod, '__version__', 'installed')}")
        except ImportError:
            typer.echo(f"{extra}: not installed")
    if scheduler:
        try:
            with DistributedContext(scheduler, timeout=timeout) as ctx:
                typer.echo(f"scheduler {scheduler}: reachable, {ctx.num_workers} workers")
        except ClusterConnectionError as exc:
            typer.echo(f"scheduler {scheduler}: NOT reachable ({exc})")
            raise typer.Exit(1)


if __name__ == "__main__":
    app()
