"""Everything MLflow, on the driver only. Workers never import this module: they `tune.report`, and the Tune
callback `MlflowLogger` below turns those reports into runs. So any tracking URI works from any node, a sqlite
store has exactly one writer, and a trial whose worker died is still closed (FAILED, with Ray's error).

Layout (docs/architecture.md, "MLflow layout"): experiment = sweep name; one parent run per sweep folder (tag
`sweep_dir`, matched exactly on --resume); one child run per Ray trial (tag `ray_trial_id`), `stage` search|confirm.
Idempotence: a child is found again by its trial id; an evaluation step already in the store is not logged
again; final metrics are logged only when the run is not FINISHED yet.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from profit_bench import UserError
from profit_bench.plan import run_name
from profit_bench.spec import GRID_ONLY, applicable_params
from profit_bench.tasks import TOY_VARIANTS

# main_steps per evaluation: the axis of the report's equal-main-update view (a PROFIT run makes fewer main updates
# per batch than a plain optimizer; epochs-budgeted runs are logged per epoch)
EVAL_KEYS = ("old_val", "new_val", "old_val_loss", "new_val_loss", "train_loss", "main_steps")
BEFORE_KEYS = {"old_val": "old_val_before", "new_val": "new_val_before"}  # the step-0 point
REACH_TIMEOUT_S = 5  # a healthy server answers /health in milliseconds
RAY_KEYS = {*AUTO_RESULT_KEYS, "iterations_since_restore", "time_since_restore", "timesteps_since_restore"}
# MLflow 3's UI opens an experiment by this tag: "custom_model_development" = the runs table and metric charts,
# not the GenAI traces page (mlflow/server/js: ExperimentKind.CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A run's params: what tells its configuration apart (the arms' fixed and searched knobs) and these; the whole
# TrialConfig is the artifact config.json. Fewer columns in MLflow's runs table, no truncated value lists.
KEY_PARAMS = ("task", "model", "method", "optimizer", "profit", "lr", "scheduler", "steps", "epochs", "batch_size",
              "n_ref", "ratio")
# Numbers of a finished trial that nothing reads as a metric: tags, so each does not draw a one-point chart on the
# run page ahead of the curves. The results that the runs table compares (test metrics, forgetting, costs) stay
# metrics, logged once at the final step.
TAG_NUMBERS = ("batches", "epochs_done", "trainable_s")
# MLflow 3.17's runs table shows no metric or param column by default (its default columns are Source, Models,
# Dataset) and keeps a parent run collapsed. What it does honour is a saved view: an experiment tag
# `mlflow.sharedViewState.<id>` holding {name, createdAt, state}, opened by `runs?viewStateShareKey=<id>` and
# listed under "Views" (mlflow/server/js: useSharedExperimentViewState, savedViewEnvelope). A view cannot expand
# rows (runsExpanded is not shared), so ours filters on the sweep's children instead of nesting them.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_METRICS = ("old_test", "new_test", "forgetting_test")  # after the objectives: the confirmation's numbers
VIEW_PARAMS = ("method", "lr")
VIEW_TAGS = ("stage", "arm", "choice")
# Sweep-wide `trial:` knobs that change the pretrained model or the data a run trains on: params too, so a run of
# table1 in reading `tanh` is told apart from one in `today` without its config.json (analysis reads them).
MODEL_DATA_KNOBS = GRID_ONLY | {"pretrain_steps", "pretrain_epochs", "pretrain_lr", "pretrain_scheduler", "limit"}


# ---------------------------------------------------------------------------------------------- helpers
def absolute_tracking_uri(uri: str) -> str:
    """sqlite:///rel.db → sqlite:////abs/rel.db (the driver may chdir; runs must land in one place)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:  # a plain folder = file store
        return Path(uri).resolve().as_uri()
    return uri


def check_reachable(uri: str) -> None:
    """Fail in seconds, on one line naming the URI, when the store cannot be reached (before Ray starts)."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACH_TIMEOUT_S).close()
        except (OSError, urllib.error.URLError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server "
                            f"--host 127.0.0.1 ...) or pass another --tracking-uri") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"--tracking-uri {uri}: folder {folder} is missing or not writable")


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise MLflow's table creation and experiment creation between processes sharing one sqlite file
    (two sweeps started at once on a new file race on alembic's tables otherwise)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri[len("sqlite:///"):] + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def store_exists(uri: str) -> bool:
    """False for a sqlite store whose file does not exist yet (looking must not create it)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def client(uri: str):
    from mlflow.tracking import MlflowClient
    with store_lock(uri):
        c = MlflowClient(tracking_uri=uri)
        c.search_experiments(max_results=1)  # creates / migrates the tables now, under the lock
    return c


def _param_str(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else str(v)
    return s[:6000]


SLOW_NOTICE_S = 30.0  # a store call still waiting after this long (server down: MLflow retries) prints a line


@contextlib.contextmanager
def _notice_while_slow(fn):
    """One line on stderr every SLOW_NOTICE_S while the store call inside has not returned: a tracking server
    that is down makes MLflow's client retry for minutes, and the sweep must not wait without a word."""
    store = getattr(getattr(getattr(fn, "__self__", None), "_tracking_client", None), "tracking_uri", None)
    done, t0 = threading.Event(), time.perf_counter()

    def watch():
        while not done.wait(SLOW_NOTICE_S):
            print(f"MLflow tracking store {store or ''} not answering for {time.perf_counter() - t0:.0f} s "
                  f"(MLflow retries; the sweep goes on once it answers)", file=sys.stderr, flush=True)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _retry(fn, *a, **kw):
    # sqlite allows one writer; an `mlflow ui` reading the same file can still hold the lock briefly.
    with _notice_while_slow(fn):
        for attempt in range(6):
            try:
                return fn(*a, **kw)
            except Exception as e:  # noqa: BLE001 - mlflow wraps the sqlalchemy error in its own types
                if "locked" not in str(e) or attempt == 5:
                    raise
                time.sleep(0.5 * 2 ** attempt)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    out = {}
    for pkg in ("profit-bench", "torch", "timm", "peft", "ray", "optuna", "mlflow", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def scalars(d: dict) -> dict:
    """The numeric entries of a result (bools and strings are tags/params, not metrics)."""
    return {k: float(v) for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}


def view_charts(objectives) -> dict:
    """The chart view's first section (MLflow's serialized chart cards): each objective's validation curve, the
    test front (scatter of the objectives' test metrics, one point per run) and a bar per run of each test metric
    and forgetting. MLflow appends a chart per other metric below, in its own "Model metrics" section."""
    section = "profit_bench.comparison"
    tests = [k.replace("_val", "_test") for k in objectives]
    base = {"metricSectionId": section, "deleted": False, "isGenerated": False, "runsCountToCompare": 100}
    line = {"type": "LINE", "lineSmoothness": 0, "scaleType": "linear", "xAxisScaleType": "linear",
            "xAxisKey": "step", "selectedXAxisMetricKey": "", "useGlobalXaxisKey": True,
            "useGlobalLineSmoothing": True}
    charts = [{**base, **line, "uuid": f"curve.{k}", "metricKey": k, "selectedMetricKeys": [k]} for k in objectives]
    if len(tests) == 2:
        charts.append({**base, "uuid": "front", "type": "SCATTER", "xaxis": {"key": tests[0], "type": "METRIC"},
                       "yaxis": {"key": tests[1], "type": "METRIC"}})
    charts += [{**base, "uuid": f"bar.{k}", "type": "BAR", "metricKey": k}
               for k in dict.fromkeys([*tests, "forgetting_test"])]
    sections = [{"uuid": section, "name": "PROFIT vs baselines", "display": True,
                 "isReordered": False, "deleted": False, "isGenerated": False}]
    sections += [{"uuid": f"profit_bench.{n.split()[0].lower()}", "name": n, "display": True, "isReordered": False,
                  "deleted": False, "isGenerated": True} for n in ("Model metrics", "System metrics")]
    return {"compareRunCharts": charts, "compareRunSections": sections, "isAccordionReordered": False}


# ---------------------------------------------------------------------------------------------- the sweep
class Sweep:
    """The experiment and the parent run of one sweep folder."""

    def __init__(self, uri: str, experiment: str, *, create: bool = True):
        """create=False: only look (no store file, no experiment is made); `ensure_experiment()` makes them when
        the sweep really starts, so an error before that leaves nothing behind."""
        self.uri, self.experiment = uri, experiment
        self.client, self.exp_id = None, None
        if create or store_exists(uri):
            self.client = client(uri)
            exp = _retry(self.client.get_experiment_by_name, experiment)
            self.exp_id = exp.experiment_id if exp is not None else None
        if create:
            self.ensure_experiment()
        self.parent_id = None
        self.commit = git_commit()
        self.versions = package_versions()
        self.wall_before, self.t0 = 0.0, time.perf_counter()  # wall_time_s = wall_before + this driver's time
        self.code: dict = {}  # code_sha256, git_dirty (sweep.pin_code): tags of the parent and every child

    def ensure_experiment(self):
        if self.client is None:
            self.client = client(self.uri)
        with store_lock(self.uri):
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                art = None
                if self.uri.startswith("sqlite:///"):
                    art = (Path(self.uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
                self.exp_id = self.client.create_experiment(self.experiment, artifact_location=art,
                                                            tags=EXPERIMENT_KIND)
            else:
                self.exp_id = exp.experiment_id
                if exp.tags.get("mlflow.experimentKind") is None:  # made by an older version
                    self.client.set_experiment_tag(self.exp_id, *next(iter(EXPERIMENT_KIND.items())))

    def save_view(self, objectives, higher_is_better: bool) -> str:
        """The saved view of this sweep's trial runs (its id = the parent run id; see VIEW_TAG_PREFIX): stage, arm,
        method, lr and the metric columns (objectives, test numbers, forgetting), best first on the first
        objective. Written again on every start, so a view from an older version is replaced."""
        name = _retry(self.client.get_run, self.parent_id).info.run_name
        state = {"searchFilter": f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                 "orderByKey": f"metrics.`{objectives[0]}`", "orderByAsc": not higher_is_better,
                 "selectedColumns": [f"tags.`{k}`" for k in VIEW_TAGS] + [f"params.`{k}`" for k in VIEW_PARAMS]
                 + [f"metrics.`{k}`" for k in dict.fromkeys([*objectives, *VIEW_METRICS])],
                 "runsHiddenMode": "SHOW_ALL",  # the chart view draws every trial, not the first 10
                 **view_charts(objectives)}
        envelope = {"name": f"{name}: trials", "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
        _retry(self.client.set_experiment_tag, self.exp_id, VIEW_TAG_PREFIX + self.parent_id, json.dumps(envelope))
        return self.parent_id

    def parents(self) -> list:
        if self.exp_id is None:
            return []
        # Filter in Python: a folder or name with a quote would break an MLflow filter string.
        runs = _retry(self.client.search_runs, [self.exp_id], "tags.`profit_bench.role` = 'sweep'",
                      max_results=1000, order_by=["attributes.start_time DESC"])
        return runs

    def find(self, sweep_dir: str | None):
        """The parent run of `sweep_dir` (exact), or of the latest sweep of this experiment when None."""
        for r in self.parents():
            if sweep_dir is None or r.data.tags.get("sweep_dir") == sweep_dir:
                return r
        return None

    def create(self, sweep_dir: Path, spec, resolved_yaml: str, params: dict, device: str, tags: dict | None = None):
        tags = {"profit_bench.role": "sweep", "sweep": spec.name, "sweep_dir": str(sweep_dir),
                "table": spec.table, "git_commit": self.commit, "mlflow.source.git.commit": self.commit,
                "device_name": device_name(device), "mlflow.runName": sweep_dir.name, **self.code, **(tags or {})}
        self.parent_id = self.client.create_run(self.exp_id, tags=tags, run_name=sweep_dir.name).info.run_id
        params = {"sweep.yaml": resolved_yaml, **params, **{f"version.{k}": v for k, v in self.versions.items()}}
        from mlflow.entities import Param
        self.client.log_batch(self.parent_id, params=[Param(k, _param_str(v)) for k, v in params.items()])
        try:
            self.client.log_text(self.parent_id, resolved_yaml, "sweep.yaml")
        except Exception as e:  # noqa: BLE001 - an artifact store we cannot write should not stop the sweep
            print(f"warning: could not store sweep.yaml as an artifact ({e})")

    def log_pretraining(self, metas: dict):
        """Each checkpoint's old-task validation curve as `pretrain.<model>.seed<S>.old_val` (step = evaluation,
        from 1) on the parent run: the evidence that the backbones reached a plateau before fine-tuning."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = []
        for meta in metas.values():
            for i, v in enumerate(meta.get("old_val_curve") or [], start=1):
                if v is not None and math.isfinite(v):
                    batch.append(Metric(f"pretrain.{meta['model']}.seed{meta['seed']}.old_val", float(v), now, i))
        for i in range(0, len(batch), 900):  # MLflow takes at most 1000 metrics per batch
            _retry(self.client.log_batch, self.parent_id, metrics=batch[i:i + 900])

    def attach(self, run):
        self.parent_id = run.info.run_id
        _retry(self.client.update_run, self.parent_id, status="RUNNING")
        if self.code:  # a parent from before code pinning gets its tags; a changed one keeps the first hash
            from mlflow.entities import RunTag
            keep = {"code_sha256", "git_dirty"} if run.data.tags.get("code_sha256") else set()
            _retry(self.client.log_batch, self.parent_id,
                   tags=[RunTag(k, str(v)) for k, v in self.code.items() if k not in keep])

    def failed_children(self, parent) -> list:
        """Children of `parent` that ended FAILED (a finished sweep's --resume re-runs them)."""
        return _retry(self.client.search_runs, [self.exp_id],
                      f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FAILED'")

    def children(self) -> list:
        return _retry(self.client.search_runs, [self.exp_id], f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                      max_results=50000)

    def close_running(self):
        """Close every RUNNING child as KILLED (resumable)."""
        from mlflow.entities import RunTag
        for r in self.children():
            if r.info.status == "RUNNING":
                _retry(self.client.log_batch, r.info.run_id, tags=[RunTag("status", "killed")])
                _retry(self.client.set_terminated, r.info.run_id, status="KILLED")

    def kill_running(self, wall_time_s: float):
        """Close every RUNNING child and the parent as KILLED (a stop that Ray could not see through)."""
        self.close_running()
        self.finish("KILLED", {"wall_time_s": wall_time_s})

    def log_wall(self):
        """wall_time_s so far (every driver run of this sweep summed), logged as trials finish: a driver killed
        without a word (SIGKILL) loses at most the time since its last finished trial."""
        from mlflow.entities import Metric
        if self.parent_id is not None:
            wall = self.wall_before + time.perf_counter() - self.t0
            _retry(self.client.log_batch, self.parent_id,
                   metrics=[Metric("wall_time_s", wall, int(time.time() * 1000), 0)])

    def finish(self, status: str, metrics: dict, *, counts: bool = False):
        """Final metrics and status. counts=True: `metrics` holds every count (n_<stage>_<status>); a count an
        earlier driver run logged (n_search_killed, ...) that no child has any more is logged as 0, since MLflow
        keeps a metric's last value."""
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        if counts:
            old = _retry(self.client.get_run, self.parent_id).data.metrics
            metrics = {**{k: 0 for k in old if k.startswith("n_")}, **metrics}
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
        if ms:
            _retry(self.client.log_batch, self.parent_id, metrics=ms)
        _retry(self.client.set_terminated, self.parent_id, status=status)


# ---------------------------------------------------------------------------------------------- the callback
class MlflowLogger(Callback):
    """Driver-side Tune callback: one child run per trial, per-evaluation metrics, final metrics, status."""

    def __init__(self, sweep: Sweep, plan, *, metric_name: str, higher_is_better: bool):
        """`plan`: the sweep's plan.Plan (its spec, device, folders): Tune's point dicts become Points."""
        self.sweep, self.plan, self.spec = sweep, plan, plan.spec
        spec = plan.spec
        self.c = sweep.client
        self.step_key = "main_steps" if "steps" in spec.budget else "epoch"
        self.common_tags = {"mlflow.parentRunId": sweep.parent_id, "profit_bench.role": "trial",
                            "metric_name": metric_name, "higher_is_better": str(higher_is_better),
                            "git_commit": sweep.commit, "mlflow.source.git.commit": sweep.commit,
                            "device_name": device_name(plan.device), **sweep.code,
                            **{f"version.{k}": v for k, v in sweep.versions.items()}}
        self.runs: dict[str, str] = {}        # ray trial id → MLflow run id
        self.stage: dict[str, str] = {}       # ray trial id → "search" | "confirm"
        self.logged: dict[str, float] = {}    # ray trial id → last evaluation step in the store
        self.finished: set[str] = set()       # trial ids whose run is FINISHED with its final metrics
        self.trials = []                      # Tune's trial list (kept fresh by on_step_end), for reconcile()
        self.load_existing()
        try:  # what the link the sweep prints opens; a store that refuses the tag must not stop the sweep
            sweep.save_view(spec.objectives, higher_is_better)
        except Exception as e:  # noqa: BLE001 - MLflow wraps store errors in its own types
            print(f"warning: could not save the sweep's MLflow view ({e}); the runs are in the experiment as usual")

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl; the live logger is put back on restore (sweep.run_stage).
        return {}

    # -- start-up: what a previous driver left
    def load_existing(self):
        """Index the parent's children by trial id; delete duplicates (a crash between create and tag)."""
        by_trial: dict[str, list] = {}
        for r in self.sweep.children():
            by_trial.setdefault(r.data.tags.get("ray_trial_id", ""), []).append(r)
        for tid, runs in by_trial.items():
            runs.sort(key=lambda r: (r.info.status != "FINISHED", r.info.start_time))
            for extra in runs[1:]:
                _retry(self.c.delete_run, extra.info.run_id)
            keep = runs[0]
            self.runs[tid] = keep.info.run_id
            self.stage[tid] = keep.data.tags.get("stage", "search")
            if keep.info.status == "FINISHED":
                self.finished.add(tid)
            hist = _retry(self.c.get_metric_history, keep.info.run_id, "old_val")
            self.logged[tid] = max((m.step for m in hist), default=-1)

    def done_results(self) -> dict:
        """Final metrics of FINISHED children: a trial Ray re-runs after a crash reports these instead of
        training again (Ray may not have recorded its end before the driver died)."""
        out = {}
        for tid in self.finished:
            run = _retry(self.c.get_run, self.runs[tid])
            out[tid] = {**run.data.metrics, "status": run.data.tags.get("status", "ok"), "final": True,
                        "replayed": True}
        return out

    # -- Tune hooks
    def on_step_end(self, iteration, trials, **info):
        self.trials = trials

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials = trials
        point = self.plan.from_tune(trial.config["point"])
        cfg = point.config
        tags = {**self.common_tags, "ray_trial_id": trial.trial_id, "stage": point.stage,
                "arm": point.arm, "config_key": point.config_key, "status": "running",
                "mlflow.runName": run_name(point)}
        if point.choice:
            tags["choice"] = point.choice
        if point.ablation_knob:
            tags["ablation_knob"] = point.ablation_knob
        if point.search_index:  # the trial's place in its arm's Optuna study (the saturation check's order)
            tags["search_index"] = str(point.search_index)
        self.stage[trial.trial_id] = tags["stage"]
        if trial.trial_id in self.finished:
            return
        from mlflow.entities import Param, RunTag
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            run_id = _retry(self.c.create_run, self.sweep.exp_id, tags=tags,
                            run_name=tags["mlflow.runName"]).info.run_id
            self.runs[trial.trial_id], self.logged[trial.trial_id] = run_id, -1
            full = _asdict(cfg)
            params = {**compact_params(full, self.spec, point.params), "seed": point.seed, "profit": cfg.profit}
            _retry(self.c.log_batch, run_id, params=[Param(k, _param_str(v)) for k, v in sorted(params.items())])
            with contextlib.suppress(Exception):  # an artifact store we cannot write should not stop the sweep
                self.c.log_text(run_id, json.dumps(applicable_params(full), indent=2, sort_keys=True, default=str),
                                "config.json")
        else:  # a re-run after a crash or an error: same run, fresh state
            _retry(self.c.update_run, run_id, status="RUNNING")
            with contextlib.suppress(Exception):
                self.c.delete_tag(run_id, "error")
            _retry(self.c.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.trial_id
        if result.get("final") or tid in self.finished or tid not in self.runs:
            return
        step = result.get(self.step_key)
        if step is None or step <= self.logged.get(tid, -1):  # seeded re-runs repeat steps already logged
            return
        self._metrics(self.runs[tid], {k: v for k, v in result.items()
                                       if k in EVAL_KEYS or k.startswith("profit_")}, step)
        self.logged[tid] = step

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.complete(trial.trial_id, trial.last_result or {})
        self.sweep.log_wall()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.fail(trial.trial_id, _ray_error(trial), "FAILED")
        self.sweep.log_wall()

    # -- run endings
    def complete(self, tid: str, result: dict):
        run_id = self.runs.get(tid)
        if run_id is None or tid in self.finished:
            return
        if not result.get("final"):  # stopped before its last report (interrupted)
            self.fail(tid, "stopped before the end of its budget", "KILLED")
            return
        step = result.get("main_steps" if self.step_key == "main_steps" else "epochs_done", 0)
        if all(m.step != 0 for m in _retry(self.c.get_metric_history, run_id, "old_val")):
            self._metrics(run_id, {k: result[b] for k, b in BEFORE_KEYS.items() if b in result}, 0)  # pretrained
        final = {k: v for k, v in scalars(result).items() if k not in RAY_KEYS and k not in TAG_NUMBERS}
        if step <= self.logged.get(tid, -1):  # the last evaluation is the final one: one point per step
            final = {k: v for k, v in final.items() if k not in EVAL_KEYS}
        curves = {k: v for k, v in final.items() if is_curve(k)}
        self._metrics(run_id, curves, step)
        # One-off numbers (test metrics, forgetting, costs) at step 0: MLflow's chart view draws a metric whose only
        # point is at a step >= 1 as a one-dot line chart, one at step 0 as a bar per run.
        self._metrics(run_id, {k: v for k, v in final.items() if k not in curves}, 0)
        from mlflow.entities import RunTag
        tags = [RunTag("status", str(result.get("status", "ok")))]
        if result.get("diverged_reason"):  # the trial's own rule (protocol.TRIAL_DIVERGENCE_RULE)
            tags.append(RunTag("diverged_reason", str(result["diverged_reason"])))
        tags += [RunTag(k, _param_str(result[k])) for k in TAG_NUMBERS if k in result]
        if result.get("node_id"):
            tags.append(RunTag("ray_node_id", result["node_id"]))
        _retry(self.c.log_batch, run_id, tags=tags)
        _retry(self.c.set_terminated, run_id, status="FINISHED")
        self.finished.add(tid)

    def fail(self, tid: str, error: str, status: str):
        run_id = self.runs.get(tid)
        if run_id is None or tid in self.finished:
            return
        from mlflow.entities import RunTag
        _retry(self.c.log_batch, run_id, tags=[RunTag("status", "failed" if status == "FAILED" else "killed"),
                                               RunTag("error", error[-5000:])])
        _retry(self.c.set_terminated, run_id, status=status)

    def reconcile(self, stage: str):
        """After Tune returns (normally, interrupted, or resumed): every child of `stage` agrees with Ray's trial
        states.
        Finished trials are FINISHED, errored FAILED, the rest KILLED (resumable); a child whose trial the
        restored experiment never knew (created after Ray's last checkpoint) is deleted: Ray runs that point
        again under a new trial id."""
        known = {t.trial_id: t for t in self.trials}
        for tid, run_id in list(self.runs.items()):
            if self.stage.get(tid) != stage:
                continue
            t = known.get(tid)
            if t is None:
                if self.trials:
                    _retry(self.c.delete_run, run_id)
                    self.runs.pop(tid)
                continue
            if t.status == "TERMINATED":
                self.complete(tid, t.last_result or {})
            elif t.status == "ERROR":
                self.fail(tid, _ray_error(t), "FAILED")
            else:
                self.fail(tid, "interrupted; resume with --resume", "KILLED")

    def tag_diverged(self, trial_id: str, reason: str):
        from mlflow.entities import RunTag
        if trial_id in self.runs:
            _retry(self.c.log_batch, self.runs[trial_id],
                   tags=[RunTag("status", "diverged"), RunTag("diverged_reason", reason)])

    def _metrics(self, run_id: str, values: dict, step):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        ms = [Metric(k, v if math.isfinite(v) else float("nan"), now, int(step)) for k, v in scalars(values).items()]
        if ms:
            _retry(self.c.log_batch, run_id, metrics=ms)


def is_curve(key: str) -> bool:
    """A metric logged at every evaluation (its final value closes the curve at the last step): the validation
    metrics and PROFIT's diagnostics (their final value is the mean over the evaluation windows)."""
    return key in EVAL_KEYS or (key.startswith("profit_") and key != "profit_state_bytes")


def compact_params(cfg_dict: dict, spec, point_params: dict) -> dict:
    """The params of a trial run: KEY_PARAMS, every knob some arm of the sweep fixes or searches (and the point's
    own) and the `trial:` block's MODEL_DATA_KNOBS (with a toy_variant, the knobs it fills), where they apply to
    this run (spec.applicable_params); other sweep-wide fields (eval_every, dtype, ...) stay in config.json. A
    method's own knobs (l2sp_alpha, ewc_lambda, ...) live in the config's method_args: they are params under their
    own names, as the spec names them, so the report can tell two configurations of one arm apart."""
    knobs = set(KEY_PARAMS) | set(point_params)
    knobs |= {k for k, v in spec.trial.items() if v is not None and k in MODEL_DATA_KNOBS}
    for a in spec.arms:
        knobs |= set(a.fixed) | set(a.space)
    if "toy_variant" in knobs and cfg_dict.get("toy_variant") in TOY_VARIANTS:
        knobs |= set(TOY_VARIANTS[cfg_dict["toy_variant"]])
    flat = {**(cfg_dict.get("method_args") or {}), **applicable_params(cfg_dict)}
    return {k: v for k, v in flat.items() if k in knobs}


def _asdict(cfg) -> dict:
    from dataclasses import asdict
    return asdict(cfg)


def _ray_error(trial) -> str:
    err = None
    with contextlib.suppress(Exception):
        err = trial.get_error()
    return str(err or trial.error_file or "the trial's worker died (no error recorded by Ray)")
