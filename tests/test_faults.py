"""Faults: a hard-killed or terminated sweep resumes with nothing lost or duplicated; an unreachable tracking
server fails fast; two sweeps on a new sqlite file do not race; resume finds its own sweep, never a prefix.

Real processes and real stores: the sweeps run as `python -m profit_bench.sweep` subprocesses (each with its
own local Ray), killed as an operator, `timeout`, Slurm or Kubernetes would kill them.
"""
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profit_bench.sweep import main

SMALL = ["--num-samples", "3", "--confirm-seeds", "1", "--set", "budget.steps=300", "--set", "trial.eval_every=100",
         "--set", "trial.pretrain_steps=50", "--set", "trial.limit=500", "--set", "max_concurrent=1",
         "--verbose", "0"]


def sweep_cmd(tmp_path, *extra):
    return [sys.executable, "-m", "profit_bench.sweep", "toy", *SMALL, "--storage-path", str(tmp_path / "ray"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]


def finished_children(db: Path) -> dict:
    """run id → end time of FINISHED child runs, read straight from the sqlite store."""
    if not db.exists():
        return {}
    con = sqlite3.connect(db, timeout=30)
    try:
        rows = con.execute("select r.run_uuid, r.end_time from runs r join tags t on t.run_uuid = r.run_uuid "
                           "where t.key = 'ray_trial_id' and r.status = 'FINISHED'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        rows = []
    finally:
        con.close()
    return dict(rows)


def start_and_stop(tmp_path, sig, *, group: bool, after: int):
    """Start a sweep in its own session, send `sig` once `after` children have FINISHED; its output."""
    proc = subprocess.Popen(sweep_cmd(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=tmp_path)
    db, deadline = tmp_path / "mlflow.db", time.time() + 400
    while len(finished_children(db)) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    if group:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def check_resumed(tmp_path, before: dict):
    """Exactly one child per trial, none RUNNING, final metrics once, finished runs untouched, no Optuna RUNNING."""
    import optuna
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags["profit_bench.role"] == "sweep"]
    kids = [r for r in runs if r.data.tags["profit_bench.role"] == "trial"]
    search = [r for r in kids if r.data.tags["stage"] == "search"]
    confirm = [r for r in kids if r.data.tags["stage"] == "confirm"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(search) == 9 and len({r.data.tags["ray_trial_id"] for r in kids}) == len(kids)
    assert sorted(r.data.tags["arm"] for r in search) == ["full"] * 3 + ["head"] * 3 + ["profit"] * 3
    assert confirm and all(r.data.params["seed"] == "1000" for r in confirm)
    assert [r.info.status for r in kids] == ["FINISHED"] * len(kids)
    for r in kids:
        assert len(client.get_metric_history(r.info.run_id, "wall_time_s")) == 1  # final metrics once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "old_val")]
        assert sorted(steps) == [0, 100, 200, 300]  # every evaluation once, also for a trial that ran twice
        assert "error" not in r.data.tags
    after = finished_children(tmp_path / "mlflow.db")
    assert all(after[run_id] == end for run_id, end in before.items())  # finished trials did not run again
    exp_dir = Path(parents[0].data.tags["sweep_dir"])
    storage = f"sqlite:///{exp_dir / 'optuna.db'}"
    for arm in ("full", "head", "profit"):
        trials = optuna.load_study(study_name=f"{exp_dir.name}/{arm}", storage=storage).trials
        assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3
    return len(kids)


@pytest.mark.slow
@pytest.mark.parametrize("after", [2, 5])
def test_sigkill_of_the_process_group_then_resume(tmp_path, after):
    rc, out = start_and_stop(tmp_path, signal.SIGKILL, group=True, after=after)
    assert rc == -signal.SIGKILL
    before = finished_children(tmp_path / "mlflow.db")
    res = subprocess.run(sweep_cmd(tmp_path, "--resume"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout
    n = check_resumed(tmp_path, before)
    print(f"SIGKILL after {after}: {n} children, 0 RUNNING, 0 duplicates")


@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["driver", "process-group"])
def test_sigterm_stops_cleanly_with_the_whole_resume_command(tmp_path, group):
    rc, out = start_and_stop(tmp_path, signal.SIGTERM, group=group, after=2)
    assert rc == 130, out[-3000:]
    hint = next(line for line in out.splitlines() if line.startswith("interrupted; continue with:"))
    assert "--num-samples 3" in hint and "--confirm-seeds 1" in hint and hint.endswith("--resume")
    before = finished_children(tmp_path / "mlflow.db")
    res = subprocess.run(sweep_cmd(tmp_path, "--resume"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    n = check_resumed(tmp_path, before)
    print(f"SIGTERM ({'group' if group else 'driver'}): {n} children, 0 RUNNING, 0 duplicates")


def test_unreachable_tracking_server_fails_in_seconds_on_one_line(tmp_path, capsys):
    import ray
    with socket.socket() as silent:  # accepts connections, never answers: the slow failure mode
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.time()
        assert main(["toy", "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray")]) == 2
        assert time.time() - t0 <= 15
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MLflow tracking server " + uri) and "\n" not in err
    assert not ray.is_initialized() and not (tmp_path / "ray").exists()  # checked before Ray started


RACE = ("import sys; from profit_bench.tracking import Sweep; s = Sweep(sys.argv[1], 'race'); "
        "print(s.exp_id)")


def test_two_sweeps_starting_at_once_on_a_new_sqlite_file(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    assert len({o[0] for o in outs}) == 1  # one experiment, created once and found by the others


def test_resume_finds_its_own_sweep_never_a_prefix(tmp_path, capsys):
    from profit_bench.spec import load_spec
    from profit_bench.tracking import Sweep
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec("toy")
    dirs = {}
    for name in ("fm_small", "fm"):  # `fm` is a prefix of `fm_small`, and the newer one
        s = Sweep(uri, name)
        dirs[name] = tmp_path / f"{name}_2026-01-01_00-00-00"
        s.create(dirs[name], spec, "spec", {}, "cpu")
        s.finish("FINISHED", {"wall_time_s": 12.5})
    for name in ("fm", "fm_small"):
        assert main(["toy", "--experiment", name, "--resume", "--tracking-uri", uri]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{dirs[name]}: this sweep has finished already")
    assert Sweep(uri, "fm").find(None).data.metrics["wall_time_s"] == 12.5  # a finished sweep's time is kept


def trial_worker_pids(session_pid: int) -> list[int]:
    """Ray actor processes running a trial (process title `ray::ImplicitFunc...`) in the sweep's session."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or os.getsid(int(pid)) != session_pid:
                continue
            if b"ImplicitFunc" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_killed_trial_worker_is_failed_by_the_driver_and_resume_completes(tmp_path):
    proc = subprocess.Popen(sweep_cmd(tmp_path, "--no-confirm", "--set", "budget.steps=600"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path)
    deadline = time.time() + 400
    while len(finished_children(tmp_path / "mlflow.db")) < 1 and time.time() < deadline:
        time.sleep(0.2)
    while not trial_worker_pids(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # inside run_trial
    os.kill(trial_worker_pids(proc.pid)[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy")
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["profit_bench.role"] == "trial"]
    failed = [r for r in kids if r.info.status == "FAILED"]
    assert len(kids) == 9 and len(failed) == 1 and failed[0].data.tags["status"] == "failed"
    assert "died" in failed[0].data.tags["error"].lower() or "actor" in failed[0].data.tags["error"].lower()
    res = subprocess.run(sweep_cmd(tmp_path, "--no-confirm", "--set", "budget.steps=600", "--resume"),
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["profit_bench.role"] == "trial"]
    assert len(kids) == 9 and len({r.data.tags["ray_trial_id"] for r in kids}) == 9
    assert all(r.info.status == "FINISHED" for r in kids)
    assert client.get_run(failed[0].info.run_id).info.status == "FINISHED"  # the same run, re-run
