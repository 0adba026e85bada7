"""Faults: a hard-killed or terminated sweep resumes with nothing lost or duplicated; an unreachable tracking
server fails fast; two sweeps on a new sqlite file do not race; resume finds its own sweep, never a prefix.

Real processes and real stores: the sweeps run as `python -m profit_bench.sweep` subprocesses (each with its
own local Ray), killed as an operator, `timeout`, Slurm or Kubernetes would kill them.
"""
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


# ---------------------------------------------------------------------------------------------- round three
# Each case below failed on commit 0c93284. In-process sweeps use a tiny grid (two trials of 20 steps).
TINY = ["--set", "budget.steps=20", "--set", "trial.eval_every=10", "--set", "trial.pretrain_steps=50",
        "--set", "trial.limit=500", "--verbose", "0", "--quiet"]
GRID_SPEC = """
name: grid
task: toy
search: grid
max_concurrent: 2
confirm_seeds: 0
budget: {steps: 20}
trial: {eval_every: 10, pretrain_steps: 50, limit: 500}
methods:
  full: {lr: 1.0e-3}
  head: {lr: 1.0e-3}
"""


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain_cache")


def grid_args(tmp_path, cache, *extra, storage=None):
    spec = tmp_path / "grid.yaml"
    spec.write_text(GRID_SPEC)
    return [str(spec), "--storage-path", str(storage or tmp_path / "ray"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}", "--cache-dir", str(cache), "--verbose", "0", "--quiet", *extra]


def sweep_runs(tmp_path, experiment="grid"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return (client, [r for r in runs if r.data.tags["profit_bench.role"] == "sweep"],
            [r for r in runs if r.data.tags["profit_bench.role"] == "trial"])


# 1. one folder per sweep
def test_launches_in_the_same_second_claim_distinct_folders(tmp_path):
    from datetime import datetime

    from profit_bench.faults import claim_sweep_dir
    now = datetime(2026, 1, 2, 3, 4, 5)
    with ThreadPoolExecutor(8) as pool:  # eight launches of one experiment, one second
        dirs = list(pool.map(lambda _: claim_sweep_dir(tmp_path, "toy", now), range(8)))
    assert len(set(dirs)) == 8 and all(d.is_dir() for d in dirs)
    assert sorted(d.name for d in dirs) == sorted(["toy_2026-01-02_03-04-05"] +
                                                  [f"toy_2026-01-02_03-04-05-{i}" for i in range(2, 9)])


def test_a_sweep_never_shares_a_folder_taken_in_the_same_second(ray_session, tmp_path, shared_cache, monkeypatch):
    from datetime import datetime

    from profit_bench import faults

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(faults, "datetime", Frozen)
    taken = tmp_path / "ray" / "grid_2026-01-02_03-04-05"  # the other launch of this second
    taken.mkdir(parents=True)
    (taken / "optuna.db").write_text("the other sweep's")
    assert main(grid_args(tmp_path, shared_cache)) == 0
    _, parents, children = sweep_runs(tmp_path)
    assert parents[0].data.tags["sweep_dir"] == str(taken) + "-2" and len(children) == 2
    assert sorted(p.name for p in taken.iterdir()) == ["optuna.db"]  # untouched


# 2. names confined
@pytest.mark.parametrize("name", ["../../esc", "a/b", "..", "/abs", "x\\y"])
def test_path_like_experiment_names_are_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert main(["toy", "--experiment", name, *TINY, "--storage-path", "deep/rr",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: experiment") and "\n" not in err
    from analysis.report import main as report_main
    assert report_main(["--experiment", name, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert report_main(["--suite", name, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: --") for line in err)
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "esc").exists()


def test_cache_keys_and_report_figure_names_stay_in_their_folder(tmp_path):
    from analysis.report import default_out
    from analysis.sections import _fig
    from profit_bench import UserError
    from profit_bench.pretrain import cache_key, default_pretrain_config
    pcfg = default_pretrain_config("toy", steps=10)
    for task, model in (("../toy", "mlp"), ("toy", "a/b"), ("toy", "..")):
        with pytest.raises(UserError, match="cannot be a folder name"):
            cache_key(task, model, 0, pcfg)
    assert _fig(tmp_path, "pareto_a/../b_toy_mlp.png").parent == tmp_path
    assert default_out(["../../esc", "x"]).parent == Path("reports")


# 3. content hashes
def _toy_ckpt(cache, seed):
    from profit_bench.pretrain import default_pretrain_config, ensure_pretrained
    pcfg = default_pretrain_config("toy", steps=20, limit=64)
    return pcfg, Path(ensure_pretrained("toy", "mlp", seed, pcfg, cache, limit=64, old_stats=[("fisher", 16)],
                                        progress=False))


def test_another_keys_checkpoint_under_valid_metadata_is_caught_moved_aside_and_rebuilt(tmp_path, capsys):
    import shutil

    import torch

    from profit_bench.pretrain import before_metrics, load_or_pretrain, old_stat, stat_path
    from profit_bench.tasks import get_task
    pcfg, p0 = _toy_ckpt(tmp_path, 0)
    _, p1 = _toy_ckpt(tmp_path, 1000)
    original = p0.read_bytes()
    shutil.copy(p1, p0)  # same model, same shapes, another seed's weights: only the content hash can tell
    capsys.readouterr()
    task = get_task("toy", seed=0, limit=64)
    model = load_or_pretrain(task, "mlp", 0, pcfg, tmp_path, progress=False)
    err = capsys.readouterr().err
    assert f"{p0}: content hash" in err and "moved aside" in err
    assert len(list(tmp_path.glob(f"{p0.name}.corrupt-*"))) == 1
    assert p0.read_bytes() == original  # rebuilt: pretraining is seeded
    assert all(torch.equal(v, torch.load(p0, weights_only=True)[k]) for k, v in model.state_dict().items())
    # an old-task statistic (EWC's Fisher): another checkpoint's copied over this one's is caught the same way
    f0, f1 = stat_path(p0, "fisher", 16), stat_path(p1, "fisher", 16)
    fisher_orig = f0.read_bytes()
    shutil.copy(f1, f0)
    fisher = old_stat(model, task, p0, "fisher", 16, 0)
    assert "content hash" in capsys.readouterr().err and f0.read_bytes() == fisher_orig
    assert all(torch.equal(fisher[k], v) for k, v in torch.load(f0, weights_only=True).items())
    # the before-metrics: a number edited in place is caught; the checkpoint's hash ties them to their weights
    before = before_metrics(model, task, p0)
    side = p0.with_name(p0.stem + ".before-cpu.json")
    saved = json.loads(side.read_text())
    saved["values"]["old_val_before"] = 123.0
    side.write_text(json.dumps(saved))
    assert before_metrics(model, task, p0) == before
    assert "do not match their content hash" in capsys.readouterr().err


def test_cache_files_without_a_hash_are_rebuilt_once(tmp_path, capsys):
    from profit_bench.pretrain import load_or_pretrain
    from profit_bench.tasks import get_task
    pcfg, p0 = _toy_ckpt(tmp_path, 0)
    meta = json.loads(p0.with_suffix(".json").read_text())
    del meta["sha256"]  # as written before content hashes existed
    p0.with_suffix(".json").write_text(json.dumps(meta))
    capsys.readouterr()
    task = get_task("toy", seed=0, limit=64)
    load_or_pretrain(task, "mlp", 0, pcfg, tmp_path, progress=False)
    assert "written before content hashes" in capsys.readouterr().err
    assert "sha256" in json.loads(p0.with_suffix(".json").read_text())
    load_or_pretrain(task, "mlp", 0, pcfg, tmp_path, progress=False)
    assert capsys.readouterr().err == ""  # once


# 4. a trial's own divergence rule
def test_an_exploded_but_finite_trial_flags_itself_diverged(tmp_path):
    from profit_bench import protocol
    from profit_bench.trial import run_trial
    r = run_trial(dict(task="toy", method="full", lr=0.5, steps=50, eval_every=25, pretrain_steps=50, limit=500,
                       cache_dir=str(tmp_path)), progress=False)
    assert math.isfinite(r["new_val_loss"]) and r["new_val_loss"] >= 10 * r["new_val_loss_before"]
    assert r["status"] == "diverged" and "pretrained model's" in r["diverged_reason"]
    ok = run_trial(dict(task="toy", method="full", lr=1e-3, steps=50, eval_every=25, pretrain_steps=50, limit=500,
                        cache_dir=str(tmp_path)), progress=False)
    assert ok["status"] == "ok" and ok["diverged_reason"] == ""
    assert protocol.trial_divergence_reason(9.99, 1.0) is None and protocol.trial_divergence_reason(10.0, 1.0)
    assert protocol.trial_divergence_reason(float("inf"), 1.0) == "new_val_loss is not finite"


def test_a_sweep_where_every_trial_exploded_keeps_them_all_diverged():
    import pandas as pd

    from profit_bench import protocol
    # three exploded trials: each is its own sweep's median, so the relative rule alone marks none
    df = pd.DataFrame({"old_val": [1700.0, 1800.0, 1900.0], "new_val": [1.0e5, 1.1e5, 1.2e5],
                       "old_val_before": [0.15] * 3, "new_val_before": [0.6] * 3,
                       "status": ["diverged"] * 3, "diverged_reason": ["new_val_loss 1e+05 >= 10×"] * 3})
    assert protocol.mark_diverged(df.assign(status="ok"), False)["diverged"].sum() == 0
    marked = protocol.mark_diverged(df, False)
    assert marked["diverged"].all() and (marked["diverged_reason"] == "new_val_loss 1e+05 >= 10×").all()


# 5. counts and wall time after resumes
def test_parent_counts_and_wall_time_are_right_after_a_resume(ray_session, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("PROFIT_BENCH_FAIL_ARM", "head")
    assert main(grid_args(tmp_path, shared_cache)) == 0
    client, parents, _ = sweep_runs(tmp_path)
    first = parents[0].data.metrics
    assert first["n_search_failed"] == 1 and first["n_search_ok"] == 1
    assert len(client.get_metric_history(parents[0].info.run_id, "wall_time_s")) >= 2  # logged as trials end
    monkeypatch.delenv("PROFIT_BENCH_FAIL_ARM")
    t0 = time.time()
    assert main(grid_args(tmp_path, shared_cache, "--resume")) == 0  # the failed trial runs again
    second = time.time() - t0
    _, parents, children = sweep_runs(tmp_path)
    m = parents[0].data.metrics
    assert m["n_search_ok"] == 2 and m["n_search_failed"] == 0  # a count that dropped to zero is written
    assert [r.info.status for r in children] == ["FINISHED"] * 2
    assert first["wall_time_s"] < m["wall_time_s"] <= first["wall_time_s"] + second


def test_wall_time_survives_a_driver_killed_without_a_word(tmp_path):
    from profit_bench.spec import load_spec
    from profit_bench.tracking import Sweep
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = Sweep(uri, "w")
    s.create(tmp_path / "w_1", load_spec("toy"), "spec", {}, "cpu")
    s.wall_before, s.t0 = 100.0, time.perf_counter() - 5.0  # a resumed driver, 5 s in
    s.log_wall()  # what the logger does as each trial ends; then SIGKILL: finish never runs
    assert Sweep(uri, "w").find(None).data.metrics["wall_time_s"] >= 105.0


# 6. full disk, errors before the start, Ctrl-C in the report, a silent server, the README's flags
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_says_where_and_how_much_then_resume_works(ray_session, tmp_path, small_disk, capsys):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 1024 ** 2 + 512 * 1024))  # ~0.5 MB left; a toy checkpoint is ~1 MB
    args = grid_args(tmp_path, small_disk / "cache", storage=small_disk / "ray")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = next(x for x in err if x.startswith("error: "))
    assert "disk full writing " + str(small_disk / "cache") in line and "MB free" in line and line.endswith("--resume")
    _, parents, children = sweep_runs(tmp_path)
    assert parents[0].info.status == "KILLED" and all(r.info.status != "RUNNING" for r in children)
    filler.unlink()
    assert main(args + ["--resume"]) == 0
    _, parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert [r.info.status for r in children] == ["FINISHED"] * 2


@pytest.mark.parametrize("argv", [["no_such_sweep"], ["toy", "--set", "budget.steps=-1"], ["toy", "--resume"],
                                  ["toy", "--gpus-per-trial", "1"]], ids=["unknown", "bad-set", "resume", "gpus"])
def test_errors_before_a_sweep_starts_write_nothing(ray_session, tmp_path, monkeypatch, capsys, argv):
    import torch
    if "--gpus-per-trial" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--storage-path", "ray", "--tracking-uri", "sqlite:///mlflow.db", "--verbose", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # no db, no experiment, no folder


def test_ctrl_c_in_the_report_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from analysis import report

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "load_runs", interrupt)
    assert report.main(["--experiment", "x", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "\n" not in err


def test_a_tracking_server_that_stops_answering_prints_a_line_every_period(monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from profit_bench import tracking
    monkeypatch.setattr(tracking, "SLOW_NOTICE_S", 0.5)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:  # accepts, never answers: a server that hangs mid-sweep
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(Exception):
            tracking._retry(MlflowClient(uri).search_experiments)
    lines = [x for x in capsys.readouterr().err.splitlines() if "not answering" in x]
    assert len(lines) >= 2 and all(uri in x for x in lines)


def test_the_readme_small_cpu_flags_work_on_every_sweep(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    flags = ["--set", "budget.epochs=1", "--set", "trial.limit=1000", "--set", "seeds=[0]", "--confirm-seeds", "2"]
    assert "--set budget.epochs=1 --set trial.limit=1000 --set seeds=[0]\n--confirm-seeds 2" in readme
    names = sorted(p.stem for p in (Path(__file__).parent.parent / "sweeps").glob("*.yaml"))
    assert {"fmnist", "digits"} <= set(names)
    failed = {n: capsys.readouterr().err for n in names if main([n, *flags, "--dry-run"]) != 0}
    assert failed == {}
    from profit_bench.spec import load_spec
    spec = load_spec("fmnist", ["budget.epochs=1"])
    # PROFIT itself runs without warm-up (issue 24); Table 13's warm-up arm searches [1, 3], fitted to [1, 1]
    assert "warmup_epochs" not in next(a for a in spec.arms if a.label == "profit").space
    assert next(a for a in spec.arms if a.label == "profit_warmup").space["warmup_epochs"] == {"int": [1, 1]}
    assert "warmup_epochs:\n      int:\n      - 1\n      - 1" in __import__("yaml").safe_dump(spec.resolved())


# 7. code pinning
def test_code_fingerprint_sees_an_edit(tmp_path):
    import shutil

    from profit_bench.faults import CODE_PACKAGES, code_fingerprint
    root = Path(__file__).parent.parent
    for pkg in CODE_PACKAGES:
        shutil.copytree(root / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(tmp_path) == code_fingerprint(root)
    with open(tmp_path / "profit_bench" / "loop.py", "a") as f:
        f.write("# edited during a sweep\n")
    assert code_fingerprint(tmp_path) != code_fingerprint(root)


def test_a_trial_refuses_code_other_than_its_sweep_started_with(ray_session, tmp_path, shared_cache, monkeypatch,
                                                                 capsys):
    import shutil

    from profit_bench import faults
    root = Path(__file__).parent.parent
    started = tmp_path / "started"  # the code as it was when the sweep started; the working tree was edited after
    for pkg in faults.CODE_PACKAGES:
        shutil.copytree(root / pkg, started / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (started / "profit_bench" / "loop.py").write_text((root / "profit_bench" / "loop.py").read_text() + "# old\n")
    real = faults.code_fingerprint
    monkeypatch.setattr(faults, "code_fingerprint", lambda root=None: real(started))  # the driver's view
    assert main(grid_args(tmp_path, shared_cache)) == 1  # every trial refused
    _, parents, children = sweep_runs(tmp_path)
    assert parents[0].data.tags["code_sha256"] == real(started) != real(root)
    assert parents[0].data.tags["git_dirty"] in ("true", "false", "unknown")
    assert len(children) == 2 and all(r.info.status == "FAILED" for r in children)
    assert all("code changed since the sweep started" in r.data.tags["error"] for r in children)
    assert all(r.data.tags["code_sha256"] == parents[0].data.tags["code_sha256"] for r in children)

