"""Storage the workers share, folders and arrays daskrecon owns, chunks never read as zeros.

The cluster of the first tests is started the way HPC users start theirs — ``dask scheduler``
and ``dask worker`` from Dask's own CLI — with each worker in its own mount namespace, a
private ``/tmp`` and cwd ``/``: like a worker on another node, it does not see the driver's
temporary directory (nor pytest's ``tmp_path``), only what the machine really shares
(here ``/var/tmp``). What the worker needs to run — the environment and this checkout, when
they live under ``/tmp`` (a CI clone may) — is bound back into its private ``/tmp``, as a
shared software installation would be on another node.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

import daskrecon as dr
from daskrecon.runtime import storage
from daskrecon.engine.checkpoint import Checkpoint
from daskrecon.errors import MissingChunkError, NotOwnedError, StorageNotSharedError
from daskrecon.tasks import regions

from helpers import blurs, noisy_measurements, small_dncnn, snapshot

DASK = str(Path(sys.executable).with_name("dask"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kept_under_tmp() -> list[str]:
    """The paths under /tmp a worker needs (Python environment, this checkout), outermost only."""
    import daskrecon

    needed = {os.path.realpath(sys.prefix), os.path.realpath(Path(daskrecon.__file__).parents[1])}
    under = sorted(p for p in needed if p.startswith("/tmp/"))
    return [p for p in under if not any(p != q and p.startswith(q + "/") for q in under)]


def _namespaces_work() -> str | None:
    """Why workers cannot get a mount namespace of their own here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to give workers their own mount namespace (unshare -m)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", _private_tmp("true")],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"mount namespaces unavailable: {probe.stderr.strip()}"


def _private_tmp(command: str) -> str:
    """A bash script: an empty tmpfs over /tmp, the kept paths bound back into it, then ``command``.

    The kept directories are opened before /tmp is covered and bound from those descriptors
    (``--no-canonicalize``: mount(8) would otherwise resolve the path into the new, empty /tmp)."""
    keep = _kept_under_tmp()
    opened = "".join(f'exec {3 + i}< "{p}"; ' for i, p in enumerate(keep))
    bound = "".join(f'mkdir -p "{p}" && mount --no-canonicalize --bind /proc/self/fd/{3 + i} "{p}" && '
                    for i, p in enumerate(keep))
    return f"set -e; {opened}mount -t tmpfs tmpfs /tmp && {bound}cd / && {command}"


@pytest.fixture(scope="module")
def island():
    """A scheduler and two workers started with Dask's CLI, each worker with a private /tmp (its own node)."""
    why = _namespaces_work()
    if why:
        pytest.skip(why)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for i in range(2):
        node = _private_tmp(f'exec "{DASK}" worker {address} --nworkers 1 --nthreads 1 --memory-limit 3GiB '
                            f'--no-dashboard --name node{i}')
        procs.append(subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", node],
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from distributed import Client

        deadline = time.time() + 90
        while True:
            try:
                with Client(address, timeout=5) as c:
                    c.wait_for_workers(2, timeout=max(1, deadline - time.time()))
                break
            except (OSError, TimeoutError):
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in procs[::-1]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def shared_dir():
    """A folder the driver and the island's workers both see."""
    where = tempfile.mkdtemp(prefix="daskrecon-test-shared-", dir="/var/tmp")
    yield where
    shutil.rmtree(where, ignore_errors=True)


def _problem(ctx, size=64, whole=False):
    """Three circular blurs: chunk-wise, or (``whole``) each an FFT on its worker — then the default step
    is the power method's, whose vectors stream through scratch Zarr out of core."""
    torch.manual_seed(0)
    ops = blurs(3)
    x = torch.rand(1, 3, size, size)
    y = noisy_measurements(ops, x, sigma=0.02)
    return (dr.distribute(ops, ctx, fast_operators=whole), y,
            dr.distribute(small_dncnn(3), ctx, patch_size=32, overlap=6))


def _tensor(ctx, out):
    return out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(ctx.client.compute(out).result()))


def test_workers_that_cannot_see_the_storage_are_refused_before_any_work(island, tmp_path, monkeypatch):
    # the driver's temporary directory, this test's own: other tests running at the same time keep theirs
    driver_tmp = tmp_path / "driver-tmp"
    driver_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(driver_tmp))
    with dr.DistributedContext(island) as ctx:
        d, y, den = _problem(ctx)
        workers = ctx.workers()
        run = dict(n_iter=2, step_size=0.5, progress=False)
        # Out of core with no checkpoint: the default scratch folder is the driver's /tmp.
        with pytest.raises(StorageNotSharedError) as err:
            dr.reconstruct(d, y, den, storage="zarr", chunks=(32, 32), **run)
        msg = str(err.value)
        assert "2 of 2 workers" in msg and all(w in msg for w in workers), msg
        assert "default scratch location" in msg and "scratch=" in msg and "checkpoint=" in msg
        # storage="auto" that decides to stream does not silently take it either.
        with monkeypatch.context() as m:
            m.setattr("daskrecon.engine.problem._WORKING_COPIES", 10**9)
            with pytest.raises(StorageNotSharedError, match="default scratch location"):
                dr.reconstruct(d, y, den, chunks=(32, 32), **run)
        # A checkpoint only the driver's machine has: out of core, and in memory (the workers write it).
        for storage_kind in ("zarr", "memory"):
            ck = tmp_path / f"ck-{storage_kind}"
            with pytest.raises(StorageNotSharedError, match=f"cannot see '{ck}'"):
                dr.reconstruct(d, y, den, storage=storage_kind, chunks=(32, 32), checkpoint=str(ck), **run)
            assert sorted(os.listdir(ck)) == [storage.OWNER_FILE]  # nothing written but the mark
    assert glob.glob(str(driver_tmp / "daskrecon-*")) == []  # no scratch left behind


@pytest.mark.parametrize("algorithm", ["pnp", "admm-cg"])
def test_a_location_every_worker_sees_gives_the_in_memory_result(island, shared_dir, algorithm):
    with dr.DistributedContext(island) as ctx:
        d, y, den = _problem(ctx, whole=True)
        kw = dict(n_iter=3, progress=False, chunks=(32, 32))
        if algorithm == "admm-cg":
            kw.update(algorithm="admm", prox_solver="cg", cg_max_iter=4)
        ref = dr.reconstruct(d, y, den, **kw)  # default step: the power method, in cluster memory
        streamed = dr.reconstruct(d, y, den, storage="zarr", scratch=shared_dir, **kw)
        assert torch.equal(_tensor(ctx, streamed), ref)  # the power method's and CG's vectors went to scratch too
        checkpointed = dr.reconstruct(d, y, den, storage="zarr",
                                      checkpoint=os.path.join(shared_dir, "ck"), **kw)
        assert torch.equal(_tensor(ctx, checkpointed), ref)
        in_memory = dr.reconstruct(d, y, den, checkpoint=os.path.join(shared_dir, "ck-mem"), **kw)
        assert torch.equal(in_memory, ref)
    # the power method's scratch folders are gone, and so is the streamed run's: its result is a tensor
    left = sorted(os.listdir(shared_dir))
    assert left == ["ck", "ck-mem"], left
    assert not any(n.startswith("scratch_power") for n in os.listdir(os.path.join(shared_dir, "ck")))


def test_zarr_inputs_the_workers_cannot_open_are_refused_not_read_as_zeros(island, tmp_path, shared_dir):
    """The user's own Zarr inputs on the driver's disk alone: every chunk would be "missing" on the workers,
    which Zarr reads as its fill value — a reconstruction, a tiled denoising, ``A x`` of zeros, without a
    word. Refused before any work, naming the input; from a folder they all see, the tensor result."""
    with dr.DistributedContext(island) as ctx:
        d, y, den = _problem(ctx)
        run = dict(n_iter=2, step_size=0.5, progress=False)
        ref = dr.reconstruct(d, y, den, **run)

        def zarr_inputs(folder):
            for i, t in enumerate(y):
                da.from_array(t.numpy(), chunks=(1, 3, 32, 32)).to_zarr(os.path.join(folder, f"y{i}.zarr"))
            return [da.from_zarr(os.path.join(folder, f"y{i}.zarr")) for i in range(len(y))]

        private = zarr_inputs(str(tmp_path))
        with pytest.raises(StorageNotSharedError, match=r"y\[0\] reads the Zarr array .* 2 of 2 workers cannot open"):
            dr.reconstruct(d, private, den, **run)
        with pytest.raises(StorageNotSharedError, match="x reads the Zarr array"):
            den(private[0], sigma=0.05)
        with pytest.raises(StorageNotSharedError, match="x reads the Zarr array"):
            d.A(private[0])
        with pytest.raises(StorageNotSharedError, match=r"y\[1\] reads the Zarr array"):
            d.A_adjoint([da.from_array(y[0].numpy()), *private[1:]])
        shared = zarr_inputs(shared_dir)
        assert torch.equal(_tensor(ctx, dr.reconstruct(d, shared, den, **run)), ref)
        assert torch.equal(_tensor(ctx, den(shared[0], sigma=0.05)), den(y[0], sigma=0.05))


def test_a_worker_that_joins_after_the_check_raises_at_its_first_read_not_zeros(island, tmp_path, monkeypatch):
    """The check above covers the workers present when a call starts. One that joins later (or recomputes a lost
    input chunk on a node without the input's disk) reads through a strict source: its first read opens the
    array's metadata, and one it cannot open is an error naming it — where a plain read gives zeros.

    The island's workers stand for such late joiners: the start-of-call check is switched off, as if it had
    run before they joined."""
    with dr.DistributedContext(island) as ctx:
        d, y, den = _problem(ctx)
        path = str(tmp_path / "y0.zarr")
        zarr.open_array(path, mode="w", shape=tuple(y[0].shape), chunks=(1, 3, 32, 32), dtype="f4")[:] = y[0].numpy()
        # the hazard itself: a worker without the driver's disk reads the array as zeros, without a word
        assert not np.asarray(ctx.client.compute(da.from_zarr(path)).result()).any()
        monkeypatch.setattr(storage, "check_sources_seen", lambda ctx, inputs: 0.0)
        late = r"worker tcp://.* cannot open the Zarr array .*y0\.zarr.* joined later"
        with pytest.raises(StorageNotSharedError, match=late):
            dr.reconstruct(d, [da.from_zarr(path), *y[1:]], den, n_iter=2, step_size=0.5, progress=False)
        with pytest.raises(StorageNotSharedError, match=late):
            ctx.client.compute(den(da.from_zarr(path), sigma=0.05)).result()
        with pytest.raises(StorageNotSharedError, match=late):
            ctx.client.compute(d.A(da.from_zarr(path))[0]).result()
        with pytest.raises(StorageNotSharedError, match=late):
            ctx.client.compute(d.A_adjoint([da.from_zarr(path), *(da.from_array(t.numpy()) for t in y[1:])])).result()


def test_xarray_zarr_inputs_are_checked_too(island, tmp_path):
    """``xarray.open_zarr`` hides the Zarr array inside its lazy indexing wrappers; the check finds it there."""
    xr = pytest.importorskip("xarray")
    with dr.DistributedContext(island) as ctx:
        _, y, den = _problem(ctx)
        path = str(tmp_path / "y.zarr")
        xr.Dataset({"y": (("b", "c", "h", "w"), y[0].numpy())}).to_zarr(path)  # written here, not by the workers
        image = xr.open_zarr(path)["y"]
        with pytest.raises(StorageNotSharedError, match=r"x reads the Zarr array .*y\.zarr/y.* 2 of 2 workers"):
            den(image, sigma=0.05)


def test_a_lazy_result_is_written_only_where_the_workers_see_it(island, tmp_path, shared_dir):
    """The batch config writes a lazy result to Zarr from the workers: a driver-only folder is refused."""
    import dask.array as da

    from daskrecon.batch.files import write_image

    with dr.DistributedContext(island) as ctx:
        x = da.ones((1, 1, 32, 32), chunks=16, dtype="f4")
        with pytest.raises(StorageNotSharedError, match="workers write the result there"):
            write_image(tmp_path / "out" / "result.zarr", x, overwrite=False, ctx=ctx)
        assert not (tmp_path / "out" / "result.zarr").exists()
        where = write_image(os.path.join(shared_dir, "result.zarr"), x, overwrite=False, ctx=ctx)
        # an OME-Zarr pyramid too: refused before anything is written, then every level of it on the driver's side
        pytest.importorskip("ome_zarr")  # the [ome] extra, installed by the [test] extra
        with pytest.raises(StorageNotSharedError, match="workers write the OME-Zarr image there"):
            dr.write_ome_zarr(x, str(tmp_path / "out" / "result.ome.zarr"), levels=2, ctx=ctx)
        with ctx.client.as_current(), pytest.raises(StorageNotSharedError, match="OME-Zarr image there"):
            dr.write_ome_zarr(x, str(tmp_path / "out" / "result.ome.zarr"), levels=2)  # Dask's current client: the same
        assert not (tmp_path / "out" / "result.ome.zarr").exists()
        ome = dr.write_ome_zarr(x, os.path.join(shared_dir, "result.ome.zarr"), levels=2, ctx=ctx)
    assert zarr.open_array(where)[...].sum() == 32 * 32  # every chunk, on the driver's side
    levels = [dr.open_ome_zarr(ome, level=k).data.compute(scheduler="sync") for k in (0, 1)]
    assert [lv.shape for lv in levels] == [(1, 1, 32, 32), (1, 1, 16, 16)] and all((lv == 1).all() for lv in levels)


def test_the_check_is_one_call_per_worker_set(ctx, tmp_path):
    store = Checkpoint(tmp_path / "ck")
    store.ensure_shared(ctx)
    store.ensure_shared(ctx)
    store.child("scratch_cg").ensure_shared(ctx)  # a folder inside a shared one is shared
    assert len(store.folder.shared.seconds) == 1 and store.folder.shared.seconds[0] < 5
    assert not any(p.name.startswith(".daskrecon-probe") for p in (tmp_path / "ck").iterdir())


def test_workers_that_join_are_checked_at_the_next_write(tmp_path):
    with dr.DistributedContext(n_workers=1, dashboard_address="127.0.0.1:0", torch_threads=1) as c:
        store = Checkpoint(tmp_path / "ck")
        store.ensure_shared(c)
        c.cluster.scale(2)
        c.client.wait_for_workers(2, timeout=60)
        deadline = time.time() + 30
        while c.num_workers < 2 and time.time() < deadline:  # the context hears of the join
            time.sleep(0.1)
        store.ensure_shared(c)
        assert len(store.folder.shared.seconds) == 2 and len(store.folder.shared.workers) == 2


def test_a_per_process_store_is_not_shared(ctx):
    # memory:// lives in one process: the workers' copies are empty.
    with pytest.raises(StorageNotSharedError, match=r"2 of 2 workers cannot see 'memory://"):
        Checkpoint("memory://daskrecon-test/ck").ensure_shared(ctx)


def test_a_deleted_chunk_of_a_checkpoint_slot_is_an_error_not_zeros(ctx, tmp_path):
    d, y, den = _problem(ctx, size=48)
    ck = tmp_path / "ck"
    ys = [da.from_array(t.numpy(), chunks=(1, 3, 24, 24)) for t in y]
    dr.reconstruct(d, ys, den, n_iter=2, step_size=0.5, progress=False, storage="zarr", checkpoint=str(ck),
                   chunks=(24, 24))
    slot = Checkpoint(ck).meta()["slot"]
    chunk = ck / "x.zarr" / "c" / str(slot) / "0" / "0" / "1" / "0"
    chunk.unlink()
    with pytest.raises(MissingChunkError) as err:
        dr.reconstruct(d, ys, den, n_iter=3, step_size=0.5, progress=False, storage="zarr", checkpoint=str(ck),
                       chunks=(24, 24), resume=True)
    msg = str(err.value)
    assert f"chunk ({slot}, 0, 0, 1, 0)" in msg and "x.zarr" in msg and "worker tcp://" in msg, msg


def test_a_deleted_chunk_of_a_saved_tensor_is_an_error_on_the_driver(tmp_path):
    store = Checkpoint(tmp_path / "ck")
    store.save(1, np.ones((1, 3, 8, 8), np.float32), {"p": 1})
    for f in (tmp_path / "ck" / "x.zarr" / "c").rglob("*"):
        if f.is_file():
            f.unlink()
    with pytest.raises(MissingChunkError, match=r"chunk \(0, 0, 0, 0, 0\) .*x\.zarr.* on the driver"):
        store.load()


@pytest.mark.parametrize("where", ["raw files", "zarr store"])
def test_owned_arrays_are_read_strictly_others_keep_the_fill_value(tmp_path, where):
    if where == "raw files":
        store = Checkpoint(tmp_path / "ck")
        mine = store.scratch("a", (4, 6), np.float32, (2, 3))
        theirs = zarr.create_array(str(tmp_path / "theirs.zarr"), shape=(4, 6), chunks=(2, 3), dtype="f4",
                                   compressors=None)
    else:  # an object-store-like store: the generic path of regions.read_region
        mine = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 6), chunks=(2, 3), dtype="f4",
                                 attributes=storage.owner_attributes("scratch"), config={"write_empty_chunks": True})
        theirs = zarr.create_array(zarr.storage.MemoryStore(), shape=(4, 6), chunks=(2, 3), dtype="f4")
    for arr in (mine, theirs):
        arr[:] = 0.0  # equal to the fill value: written all the same for daskrecon's arrays
        arr[2:, 3:] = np.arange(6, dtype="f4").reshape(2, 3) + 1
    assert storage.owned(mine) and not storage.owned(theirs)
    assert np.array_equal(regions.read_region(mine, (), ((0, 4, False), (0, 6, False)), strict=True), mine[:])
    assert mine.nchunks_initialized == 4 and theirs.nchunks_initialized == 1  # zarr skipped theirs' zero chunks
    assert np.array_equal(regions.read_region(theirs, (), ((0, 4, False), (0, 6, False)), strict=False), theirs[:])
    key = mine.metadata.encode_chunk_key((1, 0))
    if where == "raw files":
        (tmp_path / "ck" / "a.zarr" / key).unlink()
    else:
        from zarr.core.sync import sync

        sync(mine.store_path.store.delete(key))
    with pytest.raises(MissingChunkError, match=r"chunk \(1, 0\)"):
        regions.read_region(mine, (), ((1, 3, False), (0, 2, False)), strict=True)
    assert regions.read_region(mine, (), ((0, 2, False), (0, 6, False)), strict=True).shape == (2, 6)  # others read


# ---------------------------------------------------------------- folders that are not daskrecon's
def _user_folder(root: Path, arrays: dict) -> Path:
    root.mkdir()
    for name, a in arrays.items():
        z = zarr.create_array(str(root / name), shape=a.shape, chunks=a.shape, dtype=a.dtype)
        z[:] = a
    (root / "notes.txt").write_text("the user's own notes")
    return root


def test_a_folder_of_someone_elses_files_is_refused_and_left_unchanged(ctx, tmp_path):
    d, y, den = _problem(ctx, size=32)
    data = _user_folder(tmp_path / "data", {"x.zarr": np.random.default_rng(0).random((1, 3, 32, 32), np.float32)})
    before = snapshot(data)
    with pytest.raises(NotOwnedError, match=r"'.*data' exists and holds files that are not a daskrecon checkpoint "
                                            r"\(notes.txt, x.zarr\).*overwrite=True"):
        dr.reconstruct(d, y, den, n_iter=1, step_size=0.5, progress=False, checkpoint=str(data))
    for storage_kind in ("memory", "zarr"):  # even with overwrite=True, daskrecon replaces no array of theirs
        with pytest.raises(NotOwnedError, match=r"data/x.zarr exists and was not made by daskrecon"):
            dr.reconstruct(d, y, den, n_iter=1, step_size=0.5, progress=False, checkpoint=str(data), overwrite=True,
                           storage=storage_kind, chunks=(16, 16))
    after = snapshot(data)
    assert {k: v for k, v in after.items() if not k.startswith(".daskrecon")} == before
    with pytest.raises(NotOwnedError):  # nor resumed: it is not a checkpoint
        dr.reconstruct(d, y, den, n_iter=1, step_size=0.5, progress=False, checkpoint=str(data / "x.zarr"),
                       resume=True)


def test_with_overwrite_daskrecon_writes_next_to_the_users_files_and_changes_none(ctx, tmp_path):
    d, y, den = _problem(ctx, size=32)
    # The user's measurements, and an array of theirs named like one daskrecon stages
    data = _user_folder(tmp_path / "data", {**{f"y{i}.zarr": t.numpy() for i, t in enumerate(y)},
                                            "input_y_0.zarr": np.zeros((2, 2), np.float32)})
    before = snapshot(data)
    ys = [da.from_zarr(str(data / f"y{i}.zarr")) for i in range(len(y))]  # read from storage: nothing to stage
    # out of core, measurements held by the driver are staged as input_y_<i>: theirs is not replaced
    with pytest.raises(NotOwnedError, match="input_y_0.zarr exists and was not made by daskrecon"):
        dr.reconstruct(d, y, den, n_iter=1, step_size=0.5, progress=False, checkpoint=str(data), overwrite=True,
                       storage="zarr")
    out = dr.reconstruct(d, ys, den, n_iter=2, step_size=0.5, progress=False, checkpoint=str(data), overwrite=True,
                         storage="zarr")
    assert np.isfinite(_tensor(ctx, out).numpy()).all()
    after = snapshot(data)
    assert {k: after[k] for k in before} == before  # every file of theirs: same bytes, same mtime
    assert (data / "COMMIT.json").is_file() and (data / "x.zarr").is_dir()


def test_a_worker_that_finds_another_array_at_an_inputs_place_says_so(tmp_path):
    """What each worker answers for an input (run here as a worker would): the array, none, or another one."""
    from daskrecon.tasks.storage import open_sources

    path = str(tmp_path / "y.zarr")
    da.zeros((1, 1, 8, 8), chunks=4, dtype="f4").to_zarr(path)
    a = da.from_zarr(path)
    (arr,) = storage.zarr_arrays(a)
    assert open_sources([arr]) == [""]
    shutil.rmtree(path)
    assert open_sources([arr]) == ["!no array there"]
    da.zeros((1, 1, 8, 6), chunks=4, dtype="f4").to_zarr(path)  # another node's copy, of another size
    assert open_sources([arr])[0].startswith("!another array there: shape (1, 1, 8, 6)")


def test_strict_sources_read_the_same_and_refuse_an_array_they_cannot_open(tmp_path):
    """Run here as a late worker would: the wrapped array keeps its keys and values; a process that cannot open the
    array raises, where the plain array reads its fill value. Computed here, in this process (``sync``), whatever
    client an earlier test left as the default."""
    from daskrecon.tasks import storage as storage_tasks

    path = str(tmp_path / "y.zarr")
    da.arange(64, dtype="f4").reshape(1, 1, 8, 8).rechunk(4).to_zarr(path)
    plain = da.from_zarr(path)
    strict = storage.strict_sources(plain)
    assert strict.name == plain.name and strict.chunks == plain.chunks
    assert [type(v).__name__ for v in dict(strict.dask).values()].count("StrictSource") == 1
    assert storage.zarr_sources(strict) == storage.zarr_sources(plain) == [os.path.realpath(path)]
    np.testing.assert_array_equal(strict.compute(scheduler="sync"), plain.compute(scheduler="sync"))
    assert storage.strict_sources(strict).dask.layers.keys() == strict.dask.layers.keys()  # once only
    inline = da.from_zarr(path, inline_array=True)
    assert storage.strict_sources(inline) is inline  # checked when a call starts only
    storage_tasks.forget_opened()  # as a process that has not read it yet
    shutil.rmtree(path)
    assert not plain.compute(scheduler="sync").any()
    with pytest.raises(StorageNotSharedError, match=r"the driver cannot open the Zarr array .*y\.zarr.*no array there"):
        strict.compute(scheduler="sync")


def test_a_write_that_fails_leaves_no_half_written_store_even_after_its_late_writes(ctx, tmp_path):
    """A result written by the workers fails in one chunk while the others are still running: the
    store is removed (half of it would read as zeros), and the chunks written after the failure by
    the tasks that had started do not make it again."""
    import time

    import dask.array as da

    from daskrecon.batch.files import write_image
    from daskrecon.errors import WorkerTaskError

    from helpers import trip_on_first_block

    x = da.ones((1, 1, 64, 64), chunks=(1, 1, 32, 32), dtype="f4").map_blocks(trip_on_first_block, dtype="f4")
    with pytest.raises(WorkerTaskError, match="tripped on the first block"):
        write_image(tmp_path / "result.zarr", x, overwrite=False, ctx=ctx)
    pytest.importorskip("ome_zarr")  # the [ome] extra, installed by the [test] extra
    with pytest.raises(WorkerTaskError, match="tripped on the first block"):
        dr.write_ome_zarr(x, str(tmp_path / "result.ome.zarr"), levels=1, ctx=ctx)
    time.sleep(3)  # past the other chunks' end
    assert sorted(p.name for p in tmp_path.iterdir()) == []
