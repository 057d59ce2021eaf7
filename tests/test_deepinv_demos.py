"""deepinv's own distributed demos, as deepinv 0.5 ships them, run with only their import changed.

The demos are not copied into this repository: they are read from deepinv's source
distribution, downloaded from the package index for the installed deepinv version (what a
user would ``pip download``). Each runs as its users run it, ``python demo.py``, in a fresh
interpreter, with ``from deepinv.distributed import ...`` replaced by ``from daskrecon import
...`` — and with deepinv's example-image download answered offline (``tests/offline``), since
tests have no network. Their own assertions decide.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

OFFLINE = Path(__file__).parent / "offline"
IMPORT = "from deepinv.distributed import DistributedContext, distribute"


@pytest.fixture(scope="module")
def deepinv_demos(tmp_path_factory) -> Path:
    import deepinv

    where = tmp_path_factory.mktemp("deepinv-sdist")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                          "-d", str(where), f"deepinv=={deepinv.__version__}"], capture_output=True, text=True,
                         timeout=300)
    sdists = list(where.glob("deepinv-*.tar.gz"))
    if got.returncode or not sdists:
        pytest.skip(f"deepinv's source distribution could not be downloaded from the package index: "
                    f"{got.stderr.strip()[-300:]}")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/examples/distributed/" in m.name and m.name.endswith(".py")]
        try:
            tar.extractall(where, members=members, filter="data")
        except TypeError:  # Python < 3.11.4: no extraction filters (the members are plain files)
            tar.extractall(where, members=members)
    return next(where.glob("deepinv-*/examples/distributed"))


def _run(demo: Path, tmp_path: Path, edit=lambda text: text) -> subprocess.CompletedProcess:
    text = demo.read_text()
    assert text.count(IMPORT) == 1, "the demo's import line changed upstream"
    script = tmp_path / demo.name
    script.write_text(edit(text.replace(IMPORT, "from daskrecon import DistributedContext, distribute")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(OFFLINE), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg")
    return subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=280)


SIZES = (512, 256)


@pytest.fixture(scope="module")
def physics_demo_runs(deepinv_demos, tmp_path_factory):
    """The physics demo at each size, both started at once (each is a script with a cluster of its own,
    which leaves the cores idle about half its time)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(size):
        return _run(deepinv_demos / "demo_physics_distributed.py", tmp_path_factory.mktemp(f"physics-{size}"),
                    lambda text: text.replace("img_size = 512\n", f"img_size = {size}\n"))

    with ThreadPoolExecutor(max_workers=len(SIZES)) as pool:
        yield {size: pool.submit(run, size) for size in SIZES}


@pytest.mark.parametrize("size", SIZES)
def test_deepinvs_physics_demo_passes_its_own_checks(physics_demo_runs, size):
    """``demo_physics_distributed.py``: A, A_adjoint and A_adjoint_A against the plain stack at 1e-6.

    512² is the demo's own setting; 256² changes that one line."""
    out = physics_demo_runs[size].result()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("Results match exactly!") == 3 and "Demo completed successfully" in out.stdout
    assert f"Image shape: torch.Size([1, 3, {size}, {size}])" in out.stdout
