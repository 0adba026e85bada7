"""What a user sees in MLflow's web UI, through headless Chromium (skipped where no chromium is installed): the
link the sweep prints opens the experiment on its trial runs with metric columns, not on the GenAI overview.

MLflow 3.17's UI picks the page from its GenAI / Model training switch (URL `workflowType`, else the browser's
stored choice, default GenAI), not from the experiment's `mlflow.experimentKind` tag: the plain experiment URL
opens the GenAI overview (traces, token usage) even on a tagged experiment; hence `workflowType=machine_learning`
in the printed link. Its runs table shows no metric column by default and keeps the sweep's parent run collapsed;
the sweep's saved view (tracking.Sweep.save_view, `viewStateShareKey` in the link) lists the trials with their
metrics."""
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


def _store(tmp_path) -> tuple[str, str, str]:
    """A sweep's layout as the driver writes it (tracking.Sweep + one child run with curves and finals)."""
    from mlflow.entities import Metric, Param

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
    sweep.client.log_batch(child, metrics=curve + [Metric("old_test", 0.8, now, 0), Metric("new_test", 0.4, now, 0)],
                           params=[Param("method", "profit"), Param("lr", "0.001")])
    sweep.client.set_terminated(child)
    sweep.client.set_terminated(sweep.parent_id)
    sweep.save_view(["old_val", "new_val"], higher_is_better=False)
    return uri, sweep.exp_id, sweep.parent_id


def _dom(url: str, budget_ms: int = 30000) -> str:
    # wide: the runs table only renders the columns in view (ag-grid column virtualisation)
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           "--window-size=3200,1000", f"--virtual-time-budget={budget_ms}", url], timeout=300,
                          capture_output=True, text=True).stdout


def test_experiment_page_opens_on_runs_with_metric_names(tmp_path):
    uri, exp_id, parent_id = _store(tmp_path)
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
        url = ui_link(exp_id, parent_id, base)
        assert f"viewStateShareKey={parent_id}" in url and "workflowType=machine_learning" in url
        shot = os.environ.get("PROFIT_BENCH_UI_SHOT")  # a path: also save a screenshot (README images)
        if shot:
            subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                            "--window-size=1600,1000", "--virtual-time-budget=30000", url], timeout=180,
                           capture_output=True)
        dom = _dom(url)
        assert "Token Usage" not in dom  # not the GenAI overview
        assert "toy_sweep: trials" in dom  # the sweep's view is the one open
        # the trial itself in the table, not its collapsed parent
        assert "profit r=10 n=2 lr=1e-3" in dom and "<strong>1</strong> matching run<" in dom
        for column in ("metrics.`old_val`", "metrics.`new_val`", "metrics.`old_test`", "tags.`arm`", "params.`lr`"):
            assert f'col-id="{column}"' in dom, column  # a column of the runs table (ag-grid's column id)
        # The chart view (second icon above the table) opens on the view's comparison section: curves, test front.
        charts = _dom(url + "&compareRunsMode=CHART", 90000)  # the chart code is a chunk of its own: slower
        assert "PROFIT vs baselines" in charts and "old_test vs. new_test" in charts
        # Without the view the same page has the collapsed parent and no metric column: the view is what adds them.
        plain = _dom(ui_link(exp_id, None, base))
        assert "toy_sweep" in plain and "matching runs" in plain and 'col-id="metrics.' not in plain
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
