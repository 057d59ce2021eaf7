"""Scripts written for deepinv.distributed, as their authors write them, run with only the import changed.

deepinv's demos open the context at module level with no ``if __name__ == "__main__":`` guard
(torchrun scripts never need one), print ``local_indexes`` and guard output with
``ctx.rank == 0``. The scripts below have that shape; they are run the ways users run them.
"""

import os
import subprocess
import sys
import textwrap

import pytest

# A custom operator in a module beside the script: the workers must import it as the driver does.
OPERATOR_MODULE = '''
import deepinv as dinv


class ShiftedBlur(dinv.physics.Blur):
    """A user's own operator class, defined outside the script."""
'''

SCRIPT = '''
import torch
from deepinv.physics import stack
from deepinv.physics.functional.blur import gaussian_blur

from daskrecon import DistributedContext, distribute  # was: from deepinv.distributed import ...
from shifted import ShiftedBlur

print("TOP-LEVEL CODE RAN", flush=True)

with DistributedContext(seed=42) as ctx:
    if ctx.rank == 0:
        print(f"Running on {ctx.world_size} process(es)")
    ops = [ShiftedBlur(filter=gaussian_blur(sigma=(s, s)), padding="circular") for s in (1.0, 2.5, 1.5)]
    stacked_physics = stack(*ops)
    distributed_physics = distribute(stacked_physics, ctx)
    if ctx.rank == 0:
        print(f"Local operators on this rank: {len(distributed_physics.local_indexes)}")
    x = torch.rand(1, 3, 48, 40)
    y = distributed_physics(x)
    t = torch.tensor([float(len(y))])
    ctx.all_reduce(t)
    t /= ctx.world_size
    ctx.barrier()
    if ctx.rank == 0:
        diff = max((y[i] - stacked_physics(x)[i]).abs().max().item() for i in range(3))
        adj = (distributed_physics.A_adjoint(y) - stacked_physics.A_adjoint(y)).abs().max().item()
        print(f"measurements {t.item():.0f} diff {diff:.1e} adjoint {adj:.1e}")
        assert diff < 1e-5 and adj < 1e-5
print("DONE", flush=True)
'''


def _run(args, cwd, timeout=180):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert out.stdout.count("TOP-LEVEL CODE RAN") == 1, out.stdout  # not re-run by any worker
    assert "Running on 1 process(es)" in out.stdout
    assert "Local operators on this rank: 3" in out.stdout
    assert "measurements 3 diff" in out.stdout and out.stdout.rstrip().endswith("DONE")
    assert "Nanny failed" not in out.stderr


@pytest.fixture
def project(tmp_path):
    (tmp_path / "shifted.py").write_text(OPERATOR_MODULE)
    (tmp_path / "demo_script.py").write_text(SCRIPT)
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "demo_module.py").write_text(SCRIPT)
    return tmp_path


def test_unguarded_script_as_python_script(project):
    _check(_run([sys.executable, "demo_script.py"], project))


def test_unguarded_script_from_python_c(project):
    _check(_run([sys.executable, "-c", SCRIPT], project))


def test_unguarded_script_through_runpy(project):
    _check(_run([sys.executable, "-c", "import runpy; runpy.run_path('demo_script.py', run_name='__main__')"],
                project))


def test_unguarded_module_with_python_m(project):
    _check(_run([sys.executable, "-m", "mypkg.demo_module"], project))


def test_a_context_opened_in_a_spawned_child_is_refused_clearly(tmp_path):
    """If a process re-imports an unguarded script anyway (the user's own multiprocessing with
    'spawn'), the context says what to do before starting anything."""
    script = tmp_path / "spawning.py"
    script.write_text(textwrap.dedent('''
        import multiprocessing as mp
        from daskrecon import DistributedContext
        from daskrecon.runtime.cluster import spawned_by_multiprocessing
        from daskrecon.errors import DaskreconError

        if spawned_by_multiprocessing():
            try:
                DistributedContext(n_workers=1).start()
            except DaskreconError as exc:
                print("REFUSED:", exc, flush=True)
        else:
            print("PARENT", flush=True)

        def work():
            print("WORK", flush=True)

        if __name__ == "__main__":
            p = mp.get_context("spawn").Process(target=work)
            p.start()
            p.join()
    '''))
    out = _run([sys.executable, str(script)], tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("PARENT") == 1 and "WORK" in out.stdout
    assert "REFUSED:" in out.stdout and 'if __name__ == "__main__":' in out.stdout
