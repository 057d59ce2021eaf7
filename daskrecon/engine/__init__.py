"""The reconstruction engine: a problem planned once, algorithms as step rules, one Dask graph per iteration.

The path of one iteration: :mod:`.problem` plans shapes, chunks, each operator's form and
where data lives (:mod:`.terms`: the data term; the iterate's storage); :mod:`.algorithms`
are step rules; :mod:`.loop` is the one loop (progress, history, stopping, checkpoints,
resume); :mod:`.iteration` builds an iteration's graph (per-operator gradients, the fixed
tree, the tiled denoiser, the metrics); :mod:`.signal` and :mod:`.checkpoint` hold the
state, in cluster memory or Zarr; :mod:`.linsolve` runs conjugate gradient and the power
method on the cluster.

The engine receives the deepinv-compatible objects of :mod:`daskrecon.frontend` (physics,
denoiser, fidelity) and uses their public methods; it never imports that layer.
May import: :mod:`daskrecon.errors`, :mod:`daskrecon.planning`, :mod:`daskrecon.tasks`,
:mod:`daskrecon.runtime`, :mod:`daskrecon.operators`.
"""

# ``daskrecon.engine`` was the loop's module: its names stay importable from here.
from daskrecon.engine.loop import open_checkpoint, psnr, psnr_of_mse, run
from daskrecon.engine.options import ReconstructOptions

__all__ = ["ReconstructOptions", "open_checkpoint", "psnr", "psnr_of_mse", "run"]
