import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from daskrecon.engine.checkpoint import Checkpoint, CheckpointMismatchError


def test_round_trip_and_slots(tmp_path):
    ck = Checkpoint(tmp_path / "ck")
    assert not ck.exists()
    a, b = np.random.rand(2, 3, 8, 8).astype("f4"), np.random.rand(2, 3, 8, 8).astype("f4")
    ck.save(1, a, {"p": 1})
    ck.save(2, b, {"p": 1}, {"history": [1, 2]})
    got = ck.load()
    assert got.iteration == 2 and np.array_equal(got.x, b) and got.extra == {"history": [1, 2]}
    ck.check({"p": 1})
    with pytest.raises(CheckpointMismatchError, match="p, q differ"):
        ck.check({"p": 2, "q": 0})


CHILD = textwrap.dedent(
    """
    import os, signal, sys, numpy as np
    from daskrecon.engine.checkpoint import Checkpoint
    ck = Checkpoint(sys.argv[1])
    mode = sys.argv[2]
    shape = (1, 4, 2048, 2048)  # 64 MiB of incompressible data: its write takes well over 50 ms
    ck.save(1, np.full(shape, 1.0, np.float32), {"p": 1})
    data = np.random.default_rng(0).random(shape, dtype=np.float32) + 2
    if mode == "before-commit":   # data of iteration 2 written, killed before the commit
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    if mode == "during-write":    # killed halfway through writing iteration 2's chunk, whatever the load
        from zarr.storage import LocalStore
        real = LocalStore.set
        async def dying_set(self, key, value, *args, **kwargs):
            if key.split("/")[0] == "c":  # a chunk (not metadata): half its bytes reach the disk, then the kill
                data = value.to_bytes()
                path = self.root / (key + ".tmp-write")
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return await real(self, key, value, *args, **kwargs)
        LocalStore.set = dying_set
    print("writing", flush=True)
    ck.save(2, data, {"p": 1})
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("mode", ["during-write", "before-commit"])
def test_killed_writer_leaves_the_last_commit_intact(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.wait(timeout=60)  # the child kills itself at the point the mode names (a timed kill raced the write)
    assert proc.returncode == -signal.SIGKILL
    got = Checkpoint(tmp_path / "ck").load()
    assert got.iteration == 1 and (got.x == 1.0).all()
    assert not os.path.exists(tmp_path / "ck" / "COMMIT.json.tmp") or mode == "before-commit"
    if mode == "during-write":
        assert list((tmp_path / "ck").rglob("*.tmp-write"))  # it did die inside the write
