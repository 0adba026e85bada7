"""What a sweep shows: one live progress bar with the ETA, one line per finished trial, the plan (`--dry-run`) and
the summaries at the end. It prints and counts; it decides nothing and imports no Ray (raytune.TuneProgress is
`Progress` as a Ray Tune callback)."""
from __future__ import annotations

import contextlib
import json
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from profit_bench.plan import Plan, arm_seed, run_name, search_total, space_filling_count


# ---------------------------------------------------------------------------------------------- formats
def short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------- progress
@dataclass
class Meter:
    """Progress and accounting of one command (a sweep, or a suite of them): trials done / planned, elapsed, ETA,
    and the busy slot-seconds (trials and pretraining tasks) against which the harness overhead is measured.
    Shown as one live tqdm bar on stderr (only on a terminal); the command's lines go above it (`write`)."""
    concurrent: int = 1
    t0: float = field(default_factory=time.perf_counter)
    planned: dict = field(default_factory=dict)   # workload → trials it will run (upper bound until known)
    done: dict = field(default_factory=dict)      # workload → trials finished (failed included)
    trial_s: dict = field(default_factory=dict)   # workload → [seconds of each trial that ran here]
    busy_s: float = 0.0                           # trial + pretraining seconds run in this process's session
    pretrained: dict = field(default_factory=dict)  # pretrain key → checkpoint metadata (built or found)
    prior_s: dict = field(default_factory=dict)   # workload → expected trial seconds before any has run
    t_trials: float | None = None                 # when the first trial stage started (throughput ETA)
    done_here: int = 0                            # trials finished since t_trials (replayed ones excluded)
    bar: object = None                            # the live tqdm display, None until trials start

    def finished(self, workload: str, seconds: float | None):
        self.done[workload] = self.done.get(workload, 0) + 1
        if seconds is not None:
            self.busy_s += seconds
            self.trial_s.setdefault(workload, []).append(seconds)
            self.done_here += 1
        self.refresh()

    def eta(self) -> float | None:
        """Remaining trials × their workload's mean trial time / concurrent trials (a workload not started yet
        counts its prior (trial_prior_s), else the mean over every trial so far); once `concurrent` trials have
        finished here, never less than the remaining trials at the measured throughput (which includes the
        harness's own time between trials): the first estimate then stops swinging with each trial."""
        every = [x for v in self.trial_s.values() for x in v]
        if not every:  # a prior alone (pretraining time) misses Ray's actor start-up and PROFIT's n_ref + 1 cost
            return None
        left, remaining = 0.0, 0
        for w, n in self.planned.items():
            ts = self.trial_s.get(w)
            per = sum(ts) / len(ts) if ts else self.prior_s.get(w, sum(every) / len(every) if every else None)
            if per is None:
                return None
            left += max(0, n - self.done.get(w, 0)) * per
            remaining += max(0, n - self.done.get(w, 0))
        eta = left / max(1, self.concurrent)
        if self.t_trials is not None and self.done_here >= self.concurrent:
            eta = max(eta, remaining * (time.perf_counter() - self.t_trials) / self.done_here)
        return eta

    def line(self) -> str:
        done, total = sum(self.done.values()), sum(self.planned.values())
        eta = self.eta()
        return (f"{done}/{total} trials, {duration(time.perf_counter() - self.t0)} elapsed, "
                f"ETA {'~' + duration(eta) if eta is not None else '?'}")

    # -- the live display
    def start(self):
        """Show the bar (trial stages begin); on a terminal only, refreshed every second so elapsed ticks."""
        if self.t_trials is None:
            self.t_trials = time.perf_counter()
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=sum(self.planned.values()), file=sys.stderr, disable=None, dynamic_ncols=True,
                            bar_format="{desc} |{bar}|", leave=False)
            if not self.bar.disable:
                threading.Thread(target=self._tick, daemon=True).start()
        self.refresh()

    def _tick(self):
        while self.bar is not None:
            time.sleep(1.0)
            with contextlib.suppress(Exception):  # closed meanwhile
                self.refresh()

    def refresh(self):
        bar = self.bar
        if bar is None or bar.disable:
            return
        bar.total, bar.n = sum(self.planned.values()), sum(self.done.values())
        bar.set_description_str(self.line(), refresh=False)
        bar.refresh()

    def write(self, line: str, file=None):
        """A line above the bar (plain print when there is none)."""
        file = file or sys.stdout
        if self.bar is not None and not self.bar.disable:
            from tqdm import tqdm
            tqdm.write(line, file=file)
            file.flush()
        else:
            print(line, file=file, flush=True)

    def close(self):
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.close()


def say(meter: "Meter | None", line: str, file=None):
    """Print a line, above the live progress bar when there is one."""
    if meter is not None:
        meter.write(line, file)
    else:
        print(line, file=file or sys.stdout, flush=True)


class Progress:
    """One compact line per finished trial: stage, arm and knobs, old/new validation metric, status, time, and
    the command's trials done / planned, elapsed time and ETA. Its methods are Ray Tune callback hooks
    (raytune.TuneProgress); the trials are Tune's (`config["point"]`, `last_result`)."""

    def __init__(self, plan: Plan, total: int, stage: str, meter: Meter, workload: str):
        self.plan, self.total, self.stage, self.done = plan, total, stage, 0
        self.meter, self.workload = meter, workload

    def _name(self, trial) -> str:
        return run_name(self.plan.from_tune(trial.config["point"]))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        self.meter.finished(self.workload, None if r.get("replayed") else r.get("trainable_s"))
        self.meter.write(f"[{self.done}/{self.total}] {self.stage} {self._name(trial)} | old_val "
                         f"{short(r.get('old_val'))} new_val {short(r.get('new_val'))} | {r.get('status', '?')} "
                         f"{r.get('wall_time_s', 0):.1f}s | {self.meter.line()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self.meter.finished(self.workload, None)
        self.meter.write(f"[{self.done}/{self.total}] {self.stage} {self._name(trial)} | FAILED (traceback: "
                         f"{getattr(trial, 'path', None) or trial.local_path}/error.txt; MLflow tag `error`)")


# ---------------------------------------------------------------------------------------------- the plan and the end
def print_plan(plan: Plan, cpus: float, gpus: float, concurrent: int, storage_path: str, experiment: str,
               uri: str, data_dir) -> None:
    """`--dry-run`: the sweep as it would run (task, resources, folders, data, every search trial or arm)."""
    spec = plan.spec
    points = plan.search_points()
    total = search_total(spec, points)
    print(f"sweep {spec.name}: task {spec.task}, {spec.search} search, objectives "
          f"{', '.join(spec.objectives)}, budget {spec.budget}, trial settings {spec.trial}")
    if spec.trial.get("toy_variant"):
        from profit_bench.tasks import TOY_VARIANTS
        print(f"toy_variant {spec.trial['toy_variant']}: {TOY_VARIANTS.get(spec.trial['toy_variant'])}")
    print(f"resources: {cpus:g} CPU + {gpus:g} GPU per trial, at most {concurrent} at once; "
          f"device {'cuda' if gpus > 0 else 'cpu'}")
    print(f"ray: {storage_path}/{experiment}_<timestamp>; mlflow: {uri} experiment {experiment}")
    from profit_bench.tasks import describe_task_data
    for line in describe_task_data(spec.task, data_dir):
        print(line)
    if points is not None:
        print(f"{len(points)} search trials (grid, every arm its whole grid):")
        for p in points:
            print(f"  {p.arm} model={p.model} seed={p.seed} {p.params}")
    else:
        per = (f"{spec.num_samples} per arm" if spec.trials_per_dim is None else
               f"{spec.trials_per_dim} per searched dimension")
        print(f"{total} search trials ({per}, {spec.sampler}, sampler seed per arm from seed {spec.seeds[0]} and "
              f"the arm label, a scrambled-Sobol start; seeds {spec.seeds}):")
        for a in spec.arms:
            n = spec.arm_trials(a)
            print(f"  {a.label} on {a.models}: {n} trials ({space_filling_count(n)} Sobol, seed "
                  f"{arm_seed(spec.seeds[0], a.label)}), fixed {a.fixed}, search {a.space}")
    print(f"confirmation: {spec.confirm_seeds} fresh seeds per chosen configuration"
          if spec.confirm_seeds else "confirmation: off")


def report(children, metrics, exp_dir, experiment, uri, wall) -> int:
    counts = {k[2:]: int(v) for k, v in metrics.items() if k.startswith("n_")}
    print(f"\n{len(children)} runs in {wall:.0f}s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"Ray Tune results: {exp_dir}")
    print(f"MLflow: experiment {experiment!r} in {uri}")
    if uri.startswith("sqlite:"):
        exp_id = children[0].info.experiment_id if children else None
        parent = children[0].data.tags.get("mlflow.parentRunId") if children else None
        print(f"  open it: mlflow ui --backend-store-uri {uri}   (then "
              f"{ui_link(exp_id, parent) if exp_id else 'http://127.0.0.1:5000'})")
    print(f"  report:  python -m analysis.report --experiment {shlex.quote(experiment)} --tracking-uri {uri}")
    failed = sum(v for k, v in counts.items() if k.endswith("_failed"))
    if children and failed == len(children):
        print(f"error: every trial failed ({failed} of {len(children)}); see the MLflow tag `error`",
              file=sys.stderr)
        return 1
    return 0


def ui_link(exp_id, view: str | None = None, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in `mlflow ui`, on the sweep's saved view (tracking.Sweep.save_view: its trials
    with metric columns) when `view` is given. `workflowType`: MLflow 3.17 opens its GenAI overview unless the URL
    (or the browser's stored GenAI / Model training switch) says machine_learning; it does not read
    mlflow.experimentKind."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")
    return f"{base}/#/experiments/{exp_id}/runs?{query}"


def suite_summary(name, command, meter: Meter, walls: dict, codes: dict, storage: Path, uri: str) -> int:
    meter.close()
    wall = time.perf_counter() - meter.t0
    capacity = wall * meter.concurrent
    share = max(0.0, 1 - meter.busy_s / capacity) if capacity > 0 else 0.0
    out = {"suite": name, "command": command, "wall_s": wall, "concurrent": meter.concurrent,
           "busy_s": meter.busy_s, "harness_share": share, "workload_wall_s": walls,
           "trials": dict(meter.done), "exit_codes": codes}
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / f"{name}_summary_{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nsuite {name}: {sum(meter.done.values())} trials in {duration(wall)} wall "
          f"({', '.join(f'{w} {duration(s)}' for w, s in walls.items())})")
    print(f"harness overhead: {100 * share:.1f}% of {meter.concurrent} slots × {duration(wall)} (busy in trials and "
          f"pretraining: {duration(meter.busy_s)} slot-time; the rest is Ray/actor start-up, MLflow, stage barriers "
          f"and idle slots) → {path}")
    print(f"report: python -m analysis.report --suite {name} --tracking-uri {uri}")
    return max(codes.values(), default=0)
