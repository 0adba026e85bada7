import pytest

from cifar_fixture import write_fake_cifar


@pytest.fixture(scope="session")
def fake_cifar_dir(tmp_path_factory):
    """Tiny CIFAR-10 + CIFAR-100 (200 train / 100 test images each) in the layout tasks.make_cifar reads."""
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"), n_train=200, n_test=100, seed=0)
