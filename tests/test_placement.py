"""Operators stay on the worker that built them: tasks never run away from them, and they never travel."""

import threading
import time

import dask
import deepinv as dinv
import pytest
import torch
from deepinv.optim import L2
from deepinv.physics.functional.blur import gaussian_blur
from distributed import Client, LocalCluster, wait

import daskrecon as dr
from daskrecon.tasks import registry
from daskrecon.runtime.scheduler_plugin import PLACED
from daskrecon.errors import StalledError
from daskrecon.runtime.waiting import gather

from helpers import noisy_measurements, small_dncnn


class LockedBlur(dinv.physics.Blur):
    """A blur holding a lock: it cannot be pickled at all, so it must never leave its worker.

    Its forward takes 20 ms, so that the scheduler finds it worth stealing from a busy worker.
    """

    def __init__(self, sigma, device="cpu"):
        super().__init__(filter=gaussian_blur(sigma=(sigma, sigma)), padding="circular", device=device)
        self._lock = threading.Lock()

    def A(self, x, **kwargs):
        time.sleep(0.02)
        return super().A(x, **kwargs)


def locked_factory(i, device, factory_kwargs):
    return LockedBlur(1.0 + 0.4 * i, device=device)


def inc(v):
    return v + 1


@pytest.fixture(scope="module")
def busy_ctx():
    with dr.DistributedContext(n_workers=2, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as c:
        yield c


@pytest.mark.parametrize("calls", [pytest.param(20, id="20-calls"),
                                   pytest.param(300, id="300-calls", marks=pytest.mark.slow)])
def test_soak_with_a_busy_worker_and_work_stealing(busy_ctx, calls):
    """Calls while one worker is kept busy: with work stealing on, the idle worker used to steal
    operator tasks and fetch the operator; this one cannot be serialized, so the call waited for
    ever (issue #11: the old code hangs here within the first calls). Every call must finish, with
    the quiet result — reconstructions too, whose iterations are pipelined —, and no operator may
    be built twice."""
    ctx, client = busy_ctx, busy_ctx.client
    assert dask.config.get("distributed.scheduler.work-stealing")
    assert client.run_on_scheduler(lambda dask_scheduler: "stealing" in dask_scheduler.extensions)
    ops = [locked_factory(i, "cpu", None) for i in range(4)]
    d = dr.distribute(locked_factory, ctx, num_operators=4, type_object="linear_physics", fast_operators=False)
    f = dr.distribute(L2(), ctx)
    den = dr.distribute(small_dncnn(3, depth=3), ctx, patch_size=16, overlap=4)
    x = torch.rand(1, 3, 64, 64)
    y = noisy_measurements(ops, torch.rand(1, 3, 64, 64))
    grad_quiet, den_quiet = f.grad(x, y, d), den(x)
    # reconstruct pipelines its iterations (k + 1 is submitted before k's metrics are back)
    solve = lambda: dr.reconstruct(d, y, den, n_iter=4, step_size=0.5, x0=x, progress=False)  # noqa: E731
    rec_quiet = solve()
    torch.testing.assert_close(grad_quiet, L2().grad(x, y, dinv.physics.stack(*ops)), atol=1e-5, rtol=0)

    busy = ctx.workers()[0]
    stop = threading.Event()

    def keep_busy():  # a queue of tasks that only `busy` may run: the other worker idles
        while not stop.is_set():
            wait([client.submit(time.sleep, 0.1, workers=[busy], allow_other_workers=False, pure=False)
                  for _ in range(4)])

    thread = threading.Thread(target=keep_busy, daemon=True)
    thread.start()
    try:
        for k in range(calls):
            assert torch.equal(f.grad(x, y, d), grad_quiet)
            assert torch.equal(den(x), den_quiet)
            if k % 20 == 0:
                assert torch.equal(solve(), rec_quiet)
    finally:
        stop.set()
        thread.join()
    # Each operator was built once, on its owner, and never anywhere else.
    builds = client.run(registry.object_builds, d.objects.token)
    assert sorted(n for per in builds.values() for n in per.values()) == [1, 1, 1, 1]
    held = client.run(registry.held_objects, d.objects.token)
    owners = d.owners
    for w, keys in held.items():
        assert sorted(slot for _, slot in keys) == [i for i, o in enumerate(owners) if o == w]


def test_an_unpicklable_operator_object_works_when_given_as_an_object(busy_ctx):
    """Given as objects, operators travel once as their source, pickled on the driver; a blur that
    becomes unpicklable once it ran (it caches a lock) is fine: the built one is never sent."""

    class LockOnUse(dinv.physics.Blur):
        def A(self, x, **kwargs):
            self._lock = threading.Lock()
            return super().A(x, **kwargs)

    ops = [LockOnUse(filter=gaussian_blur(sigma=(1.0 + i, 1.0)), padding="circular") for i in range(3)]
    d = dr.distribute(ops, busy_ctx, fast_operators=False)
    x = torch.rand(1, 3, 16, 16)
    for _ in range(5):
        out = d.A(x)
    torch.testing.assert_close(out[2], ops[2].A(x), atol=1e-6, rtol=0)


def test_an_operator_that_already_ran_and_cannot_pickle_is_named_with_the_fix(ctx):
    """The source is pickled once, on first use; if the user's object cannot be pickled by then
    (a lock cached by an earlier run), the error names the operator and what to do."""
    from daskrecon.errors import SerializationError

    class LockOnUse(dinv.physics.Blur):
        def A(self, x, **kwargs):
            self._lock = threading.Lock()
            return super().A(x, **kwargs)

    ops = [LockOnUse(filter=gaussian_blur(sigma=(1.0 + i, 1.0)), padding="circular") for i in range(2)]
    x = torch.rand(1, 3, 16, 16)
    ops[1].A(x)  # ran on the driver before being distributed
    d = dr.distribute(ops, ctx, fast_operators=False)
    with pytest.raises(SerializationError, match=r"object 1 \(LockOnUse\) cannot be serialized.*distribute it before"):
        d.A(x)


def test_tasks_for_a_departed_owner_run_elsewhere(busy_ctx):
    """The scheduler plugin lifts the restriction of daskrecon's tasks naming only departed workers
    (a driver's owner list can lag a departure); other tasks are left as their owner wrote them."""
    client = busy_ctx.client
    gone = "tcp://127.0.0.1:9"
    with dask.annotate(daskrecon=PLACED):
        ours = client.submit(inc, 1, workers=[gone], allow_other_workers=False, pure=False)
    assert ours.result(timeout=30) == 2
    theirs = client.submit(inc, 2, workers=[gone], allow_other_workers=False, pure=False)
    with pytest.raises(StalledError, match="which left the cluster"):
        gather(client, [theirs], stall_timeout=3)


def test_owners_follow_the_cluster_when_it_grows():
    """Workers joining take over operators (fewest moves, no worker above ceil(n/w)); the old owner
    drops what it gave away; results stay bitwise the same."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client, dr.DistributedContext(client) as ctx:
        ops = [dinv.physics.Blur(filter=gaussian_blur(sigma=(1.0 + 0.5 * i, 1.0)), padding="circular")
               for i in range(4)]
        d = dr.distribute(ops, ctx)
        f = dr.distribute(L2(), ctx)
        x = torch.rand(1, 3, 24, 24)
        y = noisy_measurements(ops, torch.rand(1, 3, 24, 24))
        before = f.grad(x, y, d)
        (first,) = ctx.workers()
        assert d.owners == [first] * 4
        cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        deadline = time.monotonic() + 10
        while len(set(d.owners)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the join is announced asynchronously
        owners = d.owners
        assert owners[:2] == [first, first] and len(set(owners[2:])) == 1 and owners[2] != first
        assert torch.equal(f.grad(x, y, d), before)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            held = client.run(registry.held_objects, d.objects.token)
            if sorted(s for _, s in held[first]) == [0, 1]:
                break
            time.sleep(0.05)
        assert sorted(s for _, s in held[first]) == [0, 1]
        assert sorted(s for _, s in held[owners[2]]) == [2, 3]
