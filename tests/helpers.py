"""Small deepinv problems shared by the tests (odd sizes on purpose)."""

import torch
import deepinv as dinv
from deepinv.models import Denoiser
from deepinv.physics.functional.blur import gaussian_blur

H, W = 37, 31


def blurs(n: int = 4, channels: int = 3):
    return [
        dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + 0.4 * i, 1.0 + 0.2 * i)), padding="circular")
        for i in range(n)
    ]


def heterogeneous():
    """Blur + Downsampling + Inpainting: three different output shapes."""
    return [
        dinv.physics.Blur(filter=gaussian_blur(sigma=(1.5, 1.5)), padding="circular"),
        dinv.physics.Downsampling(img_size=(3, 36, 30), factor=2, filter="gaussian", padding="circular"),
        dinv.physics.Inpainting(img_size=(3, 36, 30), mask=0.6, rng=torch.Generator().manual_seed(1)),
    ]


def noisy_measurements(ops, x, sigma=0.05, seed=3):
    """y_i = A_i x + noise, so that y != A x (non-zero residuals)."""
    g = torch.Generator().manual_seed(seed)
    return dinv.utils.TensorList([op.A(x) + sigma * torch.randn(op.A(x).shape, generator=g).to(x.device) for op in ops])


class Exploding(dinv.physics.LinearPhysics):
    """A linear operator whose forward raises: to see worker errors reach the driver."""

    def A(self, x, **kwargs):
        raise RuntimeError("boom from operator A")

    def A_adjoint(self, y, **kwargs):
        return y


class Square(dinv.physics.Physics):
    """A non-linear operator: A(x) = w * x**2."""

    def __init__(self, w: float):
        super().__init__()
        self.w = w

    def A(self, x, **kwargs):
        return self.w * x**2


def counting_blur_factory(i, device, factory_kwargs):
    """Counts its calls on the worker it runs on (read back with client.run)."""
    from distributed import get_worker

    w = get_worker()
    w.daskrecon_builds = getattr(w, "daskrecon_builds", 0) + 1
    return dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + i, 1.0)), padding="circular", device=device)


def read_builds(dask_worker):
    return getattr(dask_worker, "daskrecon_builds", 0)


def small_dncnn(channels=3, depth=6, dim=2, seed=0):
    """A random-weight DnCNN: stride 1, receptive radius = depth."""
    from deepinv.models import DnCNN

    torch.manual_seed(seed)
    return DnCNN(channels, channels, depth=depth, nf=16, pretrained=None, dim=dim).eval()


class NonBlind(Denoiser):
    """A non-blind denoiser for parity tests: ``x + (σ / 0.05)(D(x) − x)`` with ``D`` a random DnCNN (radius = depth)."""

    def __init__(self, channels=3, depth=6, seed=0):
        super().__init__()
        self.net = small_dncnn(channels, depth, seed=seed)

    def forward(self, x, sigma):
        return x + (sigma / 0.05) * (self.net(x) - x)


class Tripping(Denoiser):
    """Raises on bright windows (mean > 0.5) at once; sleeps ``delay`` seconds on the others, then returns x.

    A run whose image is bright on one side fails there while the other side's tiles are still
    running: their chunks are written after the driver has seen the error.
    """

    def __init__(self, delay=1.5):
        super().__init__()
        self.delay = delay

    def forward(self, x, sigma=None):
        import time

        if x.mean() > 0.5:
            raise RuntimeError("tripped on a bright window")
        time.sleep(self.delay)
        return x


class TwoStripes:
    """A custom strategy: the rows cut in two halves, each with a halo of `halo` rows."""

    from daskrecon.planning.strategies import DistributedSignalStrategy as _Base

    class Strategy(_Base):
        def __init__(self, img_size, halo=8):
            super().__init__(img_size)
            self.halo = halo
            h = self.img_size[-2]
            self.cut = h // 2

        def get_num_patches(self):
            return 2

        def _rows(self, i):
            h = self.img_size[-2]
            return (slice(0, min(h, self.cut + self.halo)), 0) if i == 0 else (slice(max(0, self.cut - self.halo), h), self.cut - max(0, self.cut - self.halo))

        def get_local_patches(self, x, local_indices):
            return [(i, x[..., self._rows(i)[0], :]) for i in local_indices]

        def apply_batching(self, patches, max_batch_size=None):
            self._batching_metadata = {"original_batch_size": patches[0].shape[0]}
            return list(patches)  # different heights: one per batch

        def unpack_batched_results(self, processed_batches, num_patches):
            return list(processed_batches)

        def reduce_patches(self, out_tensor, local_pairs):
            for i, p in local_pairs:
                if i == 0:
                    out_tensor[..., : self.cut, :] = p[..., : self.cut, :]
                else:
                    off = self._rows(1)[1]
                    out_tensor[..., self.cut :, :] = p[..., off:, :]


class SlowBlur(dinv.physics.Blur):
    """A circular blur that takes `delay` seconds per call: to kill a worker mid-task."""

    def __init__(self, sigma, delay=0.4):
        super().__init__(filter=gaussian_blur(sigma=(sigma, sigma)), padding="circular")
        self.delay = delay

    def A(self, x, **kwargs):
        import time

        time.sleep(self.delay)
        return super().A(x, **kwargs)


def solver_problem():
    """A small deterministic deblurring problem (same in every process)."""
    torch.manual_seed(0)
    ops = blurs(3)
    x_true = torch.rand(1, 3, 40, 36)
    y = noisy_measurements(ops, x_true, sigma=0.02)
    return ops, y, small_dncnn(3)


def run_solver(ctx, checkpoint=None, resume=False, n_iter=8, callback=None, chunked=False):
    """``chunked=True``: the out-of-core path (Zarr-slot streaming); returns a tensor either way."""
    import dask.array as da

    import daskrecon as dr

    ops, y, model = solver_problem()
    d = dr.distribute(ops, ctx)
    den = dr.distribute(model, ctx, patch_size=16, overlap=6)
    if chunked:
        y = [da.from_array(t.numpy(), chunks=(1, 3, 20, 18)) for t in y]
    out = dr.reconstruct(d, y, den, n_iter=n_iter, step_size=0.3, progress=False, checkpoint=checkpoint,
                         resume=resume, callback=callback)
    return torch.from_numpy(ctx.client.compute(out).result()) if chunked else out


def snapshot(root):
    """Every file under ``root`` with its size, mtime and content hash: to assert nothing changed."""
    import hashlib
    from pathlib import Path

    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def kill_driver_after_commit(script, ckpt, iteration, then_sleep=0.0, timeout=180, orphans=None):
    """Run ``script`` (a driver) in a subprocess, SIGKILL it once ``ckpt`` has committed ``iteration``
    (plus ``then_sleep`` seconds, to land inside the next write); return the iteration left committed.

    ``orphans``: a list that receives the driver's child processes (its local cluster's nannies and
    workers, in sessions of their own) as they were at the kill, for the caller to check they went."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    commit = Path(ckpt) / "COMMIT.json"
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if commit.exists() and json.loads(commit.read_text())["iteration"] >= iteration:
            break
        time.sleep(0.05)
    time.sleep(then_sleep)
    if orphans is not None:
        import psutil

        orphans.extend(psutil.Process(proc.pid).children(recursive=True))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return json.loads(commit.read_text())["iteration"]


class GraphSizes:
    """A scheduler plugin recording how many tasks each graph submission brings (read with ``take``)."""

    from distributed.diagnostics.plugin import SchedulerPlugin as _Base

    class Plugin(_Base):
        name = "test-graph-sizes"

        def __init__(self):
            self.sizes = []

        def update_graph(self, scheduler, *, client, keys, tasks, annotations, priority, stimulus_id, **kwargs):
            self.sizes.append(len(tasks))

    @staticmethod
    def take(dask_scheduler=None):
        plugin = dask_scheduler.plugins["test-graph-sizes"]
        out, plugin.sizes = list(plugin.sizes), []
        return out


_PINNED: list = []


def fragment_heap(seed: int = 0) -> int:
    """Allocate and free 1-30 MiB buffers in a shuffled order, keeping small ones alive in between:
    the freed memory sits in holes of the heap that glibc cannot give back by itself."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keep = []
    for _ in range(300):
        a = torch.empty(int(rng.integers(1, 30)) * 2**20 // 4)
        a.fill_(1.0)
        keep.append(a)
        _PINNED.append(torch.empty(1000).fill_(1.0))
        if len(keep) > 20:
            keep.pop(int(rng.integers(0, len(keep) - 5)))
    keep.clear()
    return len(_PINNED)


#: A 3-D deconvolution config (tests/test_config.py, and with OME-Zarr in and out tests/test_omezarr.py).
VOLUME_CONFIG = """
[input]
measurements = ["y.zarr"]
ground_truth = "x.zarr"

[[operators]]
type = "blur"
sigma = [1.0, 1.0, 1.0]
padding = "reflect"

[denoiser]
weights = "bundled-3d"
patch_size = 16
overlap = 4

[solver]
algorithm = "fista"
iterations = 4
step_size = 1.0

[output]
path = "result.zarr"

[cluster]
kind = "local"
n_workers = 1
"""


def trip_on_first_block(block, block_info=None, delay=1.5):
    """For ``map_blocks``: raise on the first block at once, return the others after ``delay`` seconds."""
    import time

    if block_info[0]["chunk-location"] == (0,) * block.ndim:
        raise RuntimeError("tripped on the first block")
    time.sleep(delay)
    return block
