"""The batch command's machinery, one capability per module (the config's format and checks:
:mod:`daskrecon.config`).

- :mod:`.files` — image files in and out (Zarr, NPY, PNG, TIFF, OME-Zarr; paths or fsspec URLs);
- :mod:`.build` — deepinv operators, the denoiser and the cluster from the config's tables;
- :mod:`.check` — ``--check``: timings and the projected run;
- :mod:`.run` — :func:`~daskrecon.batch.run.run_config`, what ``daskrecon reconstruct CONFIG`` calls.

It sits at the top of the layers (with :mod:`daskrecon.cli` and :mod:`daskrecon.config`): it may
import anything below, and nothing below imports it.
"""
