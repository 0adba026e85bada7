"""What a user sees in MLflow's web UI, through headless Chromium (skipped where no chromium is installed): the
link the sweep prints opens the experiment on its runs table, not on the GenAI overview.

MLflow 3.17's UI picks the page from its GenAI / Model training switch (URL `workflowType`, else the browser's
stored choice, default GenAI), not from the experiment's `mlflow.experimentKind` tag: the plain experiment URL
opens the GenAI overview (traces, token usage) even on a tagged experiment; hence `?workflowType=machine_learning`
in the printed link."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(tmp_path) -> tuple[str, str]:
    """A sweep's layout as the driver writes it (tracking.Sweep + one child run with curves and finals)."""
    from mlflow.entities import Metric

    from profit_bench import tracking
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = tracking.Sweep(uri, "toy")
    sweep.parent_id = sweep.client.create_run(sweep.exp_id, tags={"profit_bench.role": "sweep"},
                                              run_name="toy_sweep").info.run_id
    child = sweep.client.create_run(sweep.exp_id, run_name="profit r=10 n=2 lr=1e-3",
                                    tags={"mlflow.parentRunId": sweep.parent_id, "profit_bench.role": "trial",
                                          "stage": "search", "arm": "profit"}).info.run_id
    now = int(time.time() * 1000)
    curve = [Metric(k, v * (1 - s / 40), now, s) for s in (0, 10, 20) for k, v in (("old_val", 0.9), ("new_val", 0.5))]
    sweep.client.log_batch(child, metrics=curve + [Metric("old_test", 0.8, now, 20)])
    sweep.client.set_terminated(child)
    sweep.client.set_terminated(sweep.parent_id)
    return uri, sweep.exp_id


def test_experiment_page_opens_on_runs_with_metric_names(tmp_path):
    uri, exp_id = _store(tmp_path)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not start")
        from profit_bench.console import ui_link
        url = ui_link(exp_id, base)
        assert url.endswith("?workflowType=machine_learning")
        shot = os.environ.get("PROFIT_BENCH_UI_SHOT")  # a path: also save a screenshot (README images)
        if shot:
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                            "--window-size=1600,1000", "--virtual-time-budget=30000", url], timeout=180,
                           capture_output=True)
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              "--virtual-time-budget=30000", url], timeout=180, capture_output=True,
                             text=True).stdout
        assert "toy_sweep" in dom and "matching runs" in dom  # the runs table, with the sweep's parent run
        assert "Token Usage" not in dom  # not the GenAI overview
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
