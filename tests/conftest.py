import os
import warnings

import pytest
import torch

os.environ.setdefault("DASK_DISTRIBUTED__WORKER__DAEMON", "True")
warnings.filterwarnings("ignore", category=DeprecationWarning, module="deepinv")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ctx():
    """Two worker processes, one thread each: a real multi-process cluster."""
    import daskrecon as dr

    with dr.DistributedContext(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0") as c:
        yield c


@pytest.fixture(scope="session")
def ctx_block():
    """Same shape of cluster, block sharding."""
    import daskrecon as dr

    with dr.DistributedContext(n_workers=2, threads_per_worker=1, processes=True, sharding="block",
                               dashboard_address="127.0.0.1:0") as c:
        yield c


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ctx1():
    import daskrecon as dr

    with dr.DistributedContext(n_workers=1, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as c:
        yield c


@pytest.fixture(scope="session")
def ctx3():
    import daskrecon as dr

    with dr.DistributedContext(n_workers=3, processes=True, dashboard_address="127.0.0.1:0", torch_threads=1) as c:
        yield c
