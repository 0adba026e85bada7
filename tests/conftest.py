import pytest

from cifar_fixture import write_fake_cifar


@pytest.fixture(scope="session")
def fake_cifar_dir(tmp_path_factory):
    """Tiny CIFAR-10 + CIFAR-100 (200 train / 100 test images each) in the layout tasks.make_cifar reads."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"), n_train=200, n_test=100, seed=0)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Sweeps without --cache-dir pretrain into the cache `trial` uses ($PROFIT_BENCH_CACHE, default
    ~/.cache/profit_bench): tests use a session folder instead of the user's home. Ray workers inherit it."""
    import os
    old = os.environ.get("PROFIT_BENCH_CACHE")
    os.environ["PROFIT_BENCH_CACHE"] = str(tmp_path_factory.mktemp("profit_bench_cache"))
    yield
    if old is None:
        os.environ.pop("PROFIT_BENCH_CACHE", None)
    else:
        os.environ["PROFIT_BENCH_CACHE"] = old


@pytest.fixture(scope="module")
def ray_session():
    """A small local Ray per test module that runs sweeps in-process (2 CPUs, no dashboard, 100 MB store)."""
    import os

    import ray
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 1024 ** 2)
    yield ray
    ray.shutdown()
