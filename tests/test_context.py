import pytest
import torch
from distributed import Client, LocalCluster

import daskrecon as dr
from daskrecon.errors import ClusterConnectionError, DeviceError


def test_local_cluster_attributes_and_threads(ctx):
    assert ctx.rank == 0 and ctx.world_size == 1 and ctx.num_workers == 2 and ctx.started and not ctx.use_dist
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert ctx.dashboard_link and ctx.dashboard_link.startswith("http://127.0.0.1")
    threads = ctx.client.run(torch.get_num_threads)
    import os

    cores = len(os.sched_getaffinity(0))
    assert sum(threads.values()) <= max(cores, len(threads))  # workers x torch threads never oversubscribe
    assert ctx.local_indices(3) == [0, 1, 2]
    assert len(set(ctx.owners(4))) == 2


def test_a_default_context_listens_on_this_machine_only():
    """Scheduler, dashboard, nannies, workers and their HTTP servers: every listening socket on loopback."""
    import os

    import psutil

    with dr.DistributedContext(n_workers=2) as c:  # every default, as the examples and the demo use it
        pids = {os.getpid(), *c.client.run(os.getpid).values(), *c.client.run(os.getpid, nanny=True).values()}
        listening = [(pid, conn.laddr) for pid in pids for conn in psutil.Process(pid).net_connections(kind="inet")
                     if conn.status == psutil.CONN_LISTEN]
    assert {pid for pid, _ in listening} == pids and len(pids) == 5, listening  # driver (scheduler), 2 nannies, 2 workers
    assert all(addr.ip in ("127.0.0.1", "::1") for _, addr in listening), listening


def test_closes_only_what_it_started():
    with dr.DistributedContext(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as c:
        cluster = c.cluster
        assert cluster.status.name == "running"
    assert cluster.status.name == "closed"
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cl, Client(cl) as client:
        with dr.DistributedContext(client) as c:
            assert c.client is client
        assert client.status == "running"
        with dr.DistributedContext(cl) as c:  # a Cluster object
            assert c.num_workers == 1
        with dr.DistributedContext(cl.scheduler_address) as c:  # an address
            assert c.num_workers == 1
        assert cl.status.name == "running"


def test_gpu_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="device_mode='gpu'"):
        dr.DistributedContext(device_mode="gpu").start()


def test_workers_compute_fp32_in_ieee_fp32_unless_tf32_is_asked_for():
    """torch's default lets cuDNN round fp32 convolutions to TF32 (about 1e-3 relative): the workers
    turn it off, so that GPU tiles equal the untiled network; ``tf32=True`` turns it on, and a
    restarted worker gets the same setting again."""
    def flags():
        import torch as t  # imported here: cloudpickle cannot ship a reference to torch.backends.cudnn

        return t.backends.cudnn.allow_tf32, t.backends.cuda.matmul.allow_tf32

    with dr.DistributedContext(n_workers=1, dashboard_address="127.0.0.1:0") as c:
        assert set(c.client.run(flags).values()) == {(False, False)}
    with dr.DistributedContext(n_workers=1, dashboard_address="127.0.0.1:0", tf32=True) as c:
        assert set(c.client.run(flags).values()) == {(True, True)}
        c.client.restart()
        assert set(c.client.run(flags).values()) == {(True, True)}
    with pytest.raises(TypeError, match="tf32 must be True or False"):
        dr.DistributedContext(tf32="yes")


def test_unreachable_scheduler_times_out_with_message():
    with pytest.raises(ClusterConnectionError, match="could not reach the Dask scheduler at 'tcp://127.0.0.1:9'"):
        dr.DistributedContext("tcp://127.0.0.1:9", timeout=2).start()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device_mode="tpu"), "device_mode must be one of"),
        (dict(sharding="random"), "sharding must be one of"),
        (dict(n_workers=0), "n_workers must be a positive int"),
        (dict(fan_in=1), "fan_in must be an int >= 2"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dr.DistributedContext(**kwargs)


def test_not_started():
    with pytest.raises(RuntimeError, match="not started"):
        dr.DistributedContext().client


def test_workers_malloc_settings(ctx):
    import os

    import daskrecon as dr

    def read():
        return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_")

    # The default, "fast": heap reuse, with the memory-pressure trim plugin on every worker.
    assert all(v == (str(64 * 2**20), str(32 * 2**20)) for v in ctx.client.run(read).values())
    assert all(ctx.client.run(lambda dask_worker: "daskrecon-trim" in dask_worker.plugins).values())
    # "safe": distributed's trim is kept (an earlier version dropped it: RSS never came down and a
    # memory-limited worker paused for good).
    with dr.DistributedContext(n_workers=1, malloc="safe", dashboard_address="127.0.0.1:0") as safe:
        assert all(v[0] == "65536" for v in safe.client.run(read).values())
    with pytest.raises(ValueError, match="malloc must be one of"):
        dr.DistributedContext(malloc="jemalloc")


def test_workers_bound_onednn_primitive_cache(ctx):
    """Every conv shape cached by oneDNN costs memory that dask counts as unmanaged; border chunks and
    tiles have many shapes (a 3-D out-of-core worker gained 1 GiB). Workers start with a small cache."""
    import os

    from daskrecon.runtime.cluster import ONEDNN_CACHE as _ONEDNN_CACHE

    got = ctx.client.run(lambda: os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
    assert set(got.values()) == {_ONEDNN_CACHE}, got
    assert 0 < int(_ONEDNN_CACHE) < 1024


def test_worker_list_does_not_race_the_clients_refresh():
    """The client refreshes a cached identity without workers every scheduler-info-interval; a worker
    list read from that cache was empty now and then (CI: operators sharded over 0 workers)."""
    import dask

    from daskrecon.runtime.memory import MemoryLimitError, check_fits

    with dask.config.set({"distributed.client.scheduler-info-interval": "1ms"}):  # refresh all the time
        with dr.DistributedContext(n_workers=2, processes=False, memory_limit="1GiB", dashboard_address="127.0.0.1:0") as c:
            for _ in range(200):
                assert len(c.workers()) == 2
                assert len(c.worker_threads()) == 2
                assert len(set(c.owners(3))) == 2
                with pytest.raises(MemoryLimitError):  # an empty list would let it pass silently
                    check_fits(c.client, 2**40, "a test", "ask for less")


def test_collectives_of_the_only_rank(ctx):
    """The driver is a one-rank world: a per-rank value summed and divided by world_size is itself."""
    import torch.distributed as dist

    t = torch.tensor([1.0, 2.0, 3.0])
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MAX, "sum", "mean"):
        out = ctx.all_reduce(t.clone(), op=op)
        assert torch.equal(out / ctx.world_size, t)
    assert torch.equal(ctx.broadcast(t.clone(), src=0), t)
    with pytest.raises(ValueError, match="only rank"):
        ctx.broadcast(t, src=1)
    gathered = ctx.all_gather(t)
    assert gathered.shape == (ctx.world_size, 3) and torch.equal(gathered[0], t)
    buffers = [torch.zeros(3)]
    assert ctx.all_gather(buffers, t) is None and torch.equal(buffers[0], t)
    objs = [None]
    ctx.all_gather_object(objs, {"a": 1})
    assert objs == [{"a": 1}]
    assert ctx.broadcast_object_list([{"k": 2}], src=0) == [{"k": 2}]
    assert ctx.barrier() is None and ctx.get_backend() is None  # torch.distributed names: no-ops
    assert torch.equal(ctx.all_reduce_(t.clone(), op="mean"), t)
    assert ctx.local_indices(5) == [0, 1, 2, 3, 4] and ctx.rank == 0 and not ctx.use_dist
    with pytest.raises(AttributeError):
        ctx.not_a_collective
    with pytest.raises(ValueError, match="op must be"):
        ctx.all_reduce(t, op="median")


def test_a_memory_limit_no_worker_can_start_in_is_refused_before_any_process_starts():
    """``memory_limit="250MB"``: each worker passed 95 % of it while loading torch and was restarted, over and
    over; the first call then failed with "n_workers must be >= 1, got 0; the cluster has no workers"."""
    import time

    import psutil

    from daskrecon.runtime.cluster import MIN_WORKER_MEMORY

    before = set(psutil.Process().children(recursive=True))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"each of the 2 workers 238 MiB, less than the 1024 MiB a worker needs"):
        dr.DistributedContext(n_workers=2, memory_limit="250MB", dashboard_address="127.0.0.1:0").start()
    assert time.monotonic() - t0 < 5 and set(psutil.Process().children(recursive=True)) == before
    # the floor itself holds: an idle worker (torch and deepinv loaded) sits under Dask's 80 % pause line
    with dr.DistributedContext(n_workers=1, memory_limit=MIN_WORKER_MEMORY, dashboard_address="127.0.0.1:0") as ctx:
        rss = list(ctx.client.run(lambda: psutil.Process().memory_info().rss).values())[0]
        assert rss < 0.8 * MIN_WORKER_MEMORY, rss


def test_objects_keep_working_when_their_context_is_closed_and_started_again():
    """``ctx.close(); ctx.start()`` (a notebook restarting its cluster): the denoiser's model had been sent to
    the old cluster only, and every call failed with "model ... has not reached this worker"."""
    from helpers import blurs, noisy_measurements, small_dncnn

    ops = blurs(2, channels=1)
    x = torch.rand(1, 1, 32, 32)
    y = noisy_measurements(ops, x)
    ctx = dr.DistributedContext(n_workers=1, dashboard_address="127.0.0.1:0").start()
    try:
        dphys = dr.distribute(ops, ctx)
        dden = dr.distribute(small_dncnn(1, depth=3), ctx, patch_size=16, overlap=4)
        before = dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.5, progress=False)
        ctx.close()
        ctx.start()
        assert torch.equal(dr.reconstruct(dphys, y, dden, n_iter=2, step_size=0.5, progress=False), before)
    finally:
        ctx.close()


def test_a_cluster_given_with_workers_too_small_for_torch_is_warned_about():
    """A cluster the user started (``dask worker --memory-limit 600MB``) is theirs to size: said, not refused."""
    import warnings

    from distributed import LocalCluster

    for limit, warned in (("600MB", True), ("2GiB", False)):
        with LocalCluster(n_workers=1, processes=False, memory_limit=limit, dashboard_address="127.0.0.1:0") as cluster:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                with dr.DistributedContext(cluster):
                    pass
            said = [w for w in seen if "memory limit under 1024 MiB" in str(w.message)]
            assert bool(said) == warned, [str(w.message) for w in seen]
            if warned:
                assert "572 MiB" in str(said[0].message) and "--memory-limit" in str(said[0].message)
