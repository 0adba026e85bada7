"""A real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head and two worker nodes) with
MLflow behind a real `mlflow server` on 127.0.0.1: trials spread over nodes, the driver is the only writer."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from profit_bench.sweep import main

SPEC = """
task: toy
search: grid
seeds: [0, 1, 2]
max_concurrent: 3
confirm_seeds: 0
budget: {steps: 200}
trial: {eval_every: 100, pretrain_steps: 50, limit: 500}
methods:
  full: {lr: {grid: [1.0e-3]}}
  profit: {lr: {grid: [1.0e-3, 3.0e-3]}, ratio: 100}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield base
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.slow
def test_sweep_on_a_three_node_cluster_through_an_mlflow_server(tmp_path, mlflow_server, capsys):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        spec = tmp_path / "cluster.yaml"
        spec.write_text(SPEC)
        assert main([str(spec), "--address", cluster.address, "--tracking-uri", mlflow_server, "--cpus-per-trial",
                     "1", "--storage-path", str(tmp_path / "ray"), "--verbose", "0"]) == 0
    finally:
        ray.shutdown()
        cluster.shutdown()
    builders = set(re.findall(r"pretrained .* on node (\w+) ", capsys.readouterr().out))
    print("pretraining node ids:", sorted(builders))
    assert len(builders) >= 2  # the checkpoints were built as Ray tasks on more than one node
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id])
    kids = [r for r in runs if r.data.tags["profit_bench.role"] == "trial"]
    assert len(kids) == 9 and len({r.data.tags["ray_trial_id"] for r in kids}) == 9
    assert all(r.info.status == "FINISHED" and r.data.tags["status"] in ("ok", "diverged") for r in kids)
    for r in kids:
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "new_val")) == [0, 100, 200]
        assert {"old_val", "new_val", "old_val_before", "wall_time_s"} <= set(r.data.metrics)
    nodes = {r.data.tags["ray_node_id"] for r in kids}
    print("trial node ids:", json.dumps(sorted(nodes)))
    assert len(nodes) >= 2
