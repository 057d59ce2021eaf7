"""WorkerRoster: the worker list is asked of the scheduler again only after an announced change (or its age bound)."""

import time

import pytest
from distributed import Client, LocalCluster

from daskrecon.runtime import roster as roster_module
from daskrecon.runtime.cluster import configure_workers
from daskrecon.runtime.roster import WorkerRoster


class _Client:
    def __init__(self):
        self.unsubscribed, self.logged = [], []
        self.scheduler = self

    def log_event(self, topic, msg):
        self.logged.append((topic, msg))

    def unsubscribe_topic(self, topic):
        self.unsubscribed.append(topic)


@pytest.fixture
def asked(monkeypatch):
    calls = []
    workers = {"tcp://b:1": {"nthreads": 2}, "tcp://a:1": {"nthreads": 1}}

    def scheduler_workers(client, timeout=None):
        calls.append(timeout)
        return dict(workers)

    monkeypatch.setattr(roster_module, "scheduler_workers", scheduler_workers)
    monkeypatch.setattr(roster_module, "bounded", lambda client, fn, what, timeout, **kw: fn(**kw))
    return calls, workers


def test_cached_until_a_change_is_announced(asked):
    calls, workers = asked
    client = _Client()
    r = WorkerRoster(client, stall_timeout=7.0)
    r.track(0)
    r.threads(), r.threads()
    assert len(calls) == 2 and len(client.logged) == 2  # not listening yet: asks, and says hello, each time
    r.on_change((0.0, {"action": "listening"}))  # the hello came back: announcements arrive
    assert r.listening and r.generation == 1
    assert r.threads() == {"tcp://a:1": 1, "tcp://b:1": 2} and list(r.threads()) == ["tcp://a:1", "tcp://b:1"]
    assert calls == [7.0] * 3 and len(client.logged) == 2  # the second answer came from the cache
    workers["tcp://c:1"] = {"nthreads": 4}
    assert "tcp://c:1" not in r.threads()
    r.on_change({"event": "add"})
    assert r.generation == 2 and r.threads()["tcp://c:1"] == 4 and len(calls) == 4
    r.threads()["tcp://z:9"] = 1  # a caller's copy: the cache is not changed through it
    assert "tcp://z:9" not in r.threads()


def test_untracked_asks_every_time_and_a_stale_answer_is_asked_again(asked, monkeypatch):
    calls, _ = asked
    r = WorkerRoster(_Client(), stall_timeout=1.0)
    r.on_change(None)  # not tracked: nothing to count
    r.threads(), r.threads()
    assert r.generation is None and len(calls) == 2
    clock = [1e9]
    monkeypatch.setattr(roster_module.time, "monotonic", lambda: clock[0])
    r.track(0)
    r.on_change(None)
    r.threads(), r.threads()
    assert len(calls) == 3
    clock[0] += roster_module.WORKERS_TTL + 1
    r.threads()
    assert len(calls) == 4


def test_close_stops_listening():
    client = _Client()
    r = WorkerRoster(client, stall_timeout=1.0)
    r.close()
    assert client.unsubscribed == []  # never subscribed
    r.track(3)
    r.close()
    assert client.unsubscribed == [roster_module.MEMBERSHIP_TOPIC] and r.generation is None


def test_workers_that_join_are_seen_long_before_the_age_bound():
    """A join right after subscribing (before the subscription reached the scheduler) is not missed."""
    with LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        r = WorkerRoster(client, stall_timeout=30.0)
        r.track(configure_workers(client, malloc="safe", torch_threads=None, device_mode=None, timeout=30,
                                  on_membership=r.on_change))
        before = r.threads()  # at once: the subscription may still be on its way
        cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        assert len(before) == 1 and len(r.threads()) == 2
        deadline = time.monotonic() + 10
        while not r.listening and time.monotonic() < deadline:
            r.threads()  # an uncached call says hello again: one sent before the subscription landed is lost
            time.sleep(0.05)
        assert r.listening and r.threads() == r.threads()
        cached = r.generation
        cluster.scale(3)
        client.wait_for_workers(3, timeout=30)
        deadline = time.monotonic() + 10
        while r.generation == cached and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(r.threads()) == 3  # announced: seen well within WORKERS_TTL (30 s)
