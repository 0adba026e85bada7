"""CIFAR on demand, offline: small archives in torchvision's layout served from 127.0.0.1."""

import dataclasses
import functools
import hashlib
import http.server
import json
import tarfile
import threading
from pathlib import Path

import pytest

from cifar_fixture import write_fake_cifar
from profit_bench import tasks

N_TRAIN, N_TEST = 200, 100


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """cifar-10-python.tar.gz and cifar-100-python.tar.gz (as torchvision's) of the tiny fixture; their md5s."""
    src = write_fake_cifar(tmp_path_factory.mktemp("src"), n_train=N_TRAIN, n_test=N_TEST, seed=3)
    out = tmp_path_factory.mktemp("served")
    md5 = {}
    for a in tasks.CIFAR_ARCHIVES:
        with tarfile.open(out / a.filename, "w:gz") as tar:
            tar.add(src / a.folder, arcname=a.folder)
        md5[a.filename] = hashlib.md5((out / a.filename).read_bytes()).hexdigest()
    return src, out, md5


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Truncating(_Quiet):
    """Announces the whole archive, sends a tenth of it and hangs up: a download cut off midway."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 10])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve(archives, monkeypatch):
    """serve(handler=_Quiet, real_md5=False): a local HTTP server with the archives; PROFIT_BENCH_CIFAR_URL points at
    it and (unless real_md5) the expected md5s are those of the served archives."""
    servers = []

    def start(handler=_Quiet, real_md5=False):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(
            archives[1])))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        monkeypatch.setenv(tasks.CIFAR_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
        if not real_md5:
            monkeypatch.setattr(tasks, "CIFAR_ARCHIVES", tuple(dataclasses.replace(a, md5=archives[2][a.filename])
                                                               for a in tasks.CIFAR_ARCHIVES))
        return httpd

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_cifar_sources_are_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100
    for a, cls in zip(tasks.CIFAR_ARCHIVES, (CIFAR10, CIFAR100)):
        assert (a.url, a.filename, a.md5, a.folder) == (cls.url, cls.filename, cls.tgz_md5, cls.base_folder)


def test_sweep_dry_run_reports_missing_data_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    from profit_bench.sweep import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tasks.CIFAR_URL_ENV, raising=False)
    empty = tmp_path / "EMPTY"
    empty.mkdir()
    assert main(["cifar", "--dry-run", "--data-dir", str(empty)]) == 0
    out = capsys.readouterr().out
    assert (f"data {empty}: CIFAR-10 missing, would download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            f"(163 MiB, md5 c58f30108f718f92721af3b95e74349a)") in out
    assert "CIFAR-100 missing, would download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in out
    assert list(empty.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["EMPTY"]

    write_fake_cifar(empty, n_train=10, n_test=10)
    assert main(["cifar", "--dry-run", "--data-dir", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "CIFAR-10 present (cifar-10-batches-py/)" in out and "CIFAR-100 present (cifar-100-python/)" in out


def test_download_puts_torchvisions_archives_in_place_and_the_task_reads_them(tmp_path, serve, archives, capsys):
    serve()
    root = tmp_path / "data"
    tasks.ensure_task_data("cifar", root)
    src = archives[0]
    for a in tasks.CIFAR_ARCHIVES:
        for f in a.files:
            assert (root / a.folder / f).read_bytes() == (src / a.folder / f).read_bytes()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-100-python"]  # no archive, no tmp
    err = capsys.readouterr().err
    assert "downloading CIFAR-10 (163 MiB) from http://127.0.0.1" in err and "100%" in err  # and tqdm's bar
    task = tasks.get_task("cifar", data_dir=root)
    assert len(task.old_test) == N_TEST and len(task.new_test) == N_TEST
    tasks.ensure_task_data("cifar", root)  # present now: nothing to do (the server could be gone)


def test_trial_cli_downloads_then_trains(tmp_path, serve, capsys):
    from profit_bench.trial import main
    serve()
    root = tmp_path / "data"
    code = main(["--task", "cifar", "--data-dir", str(root), "--model", "resnet_small", "--method", "head",
                 "--limit", "32", "--batch-size", "16", "--steps", "1", "--pretrain-epochs", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["status"] == "ok"  # torchvision's own prints stayed off stdout
    assert not tasks.cifar_missing(root)


@pytest.mark.parametrize("case", ["refused", "md5", "truncated"])
def test_failed_download_is_one_line_exit_2_and_leaves_nothing(tmp_path, serve, monkeypatch, capsys, case):
    from profit_bench.trial import main
    if case == "refused":  # no network: nothing listens there
        httpd = serve()
        httpd.shutdown()
        httpd.server_close()
    else:
        serve(_Truncating if case == "truncated" else _Quiet, real_md5=case == "md5")
    root = tmp_path / "data"
    code = main(["--task", "cifar", "--data-dir", str(root), "--steps", "1", "--quiet",
                 "--cache-dir", str(tmp_path / "cache")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert "could not download CIFAR-10 from http://127.0.0.1" in err[0] and "nothing was written" in err[0]
    if case == "md5":
        assert "checksum (md5) mismatch" in err[0]
    assert not root.exists()  # no partial archive, no half-extracted folder, not even the folder it made
