"""The Ray Tune side of the sweep driver: one Optuna study per arm behind one Tune searcher (`ArmSearch`), a
stage's TuneConfig, and the progress lines as a Tune callback. sweep.py imports this module when a stage starts,
so `import profit_bench.sweep` loads no ray.tune."""
from __future__ import annotations

import pickle
import threading
from pathlib import Path

from ray import tune
from ray.tune.search import Searcher

from profit_bench.console import Progress
from profit_bench.plan import Plan, arm_seed, search_total, space_filling_count, space_filling_points, suggest


# ---------------------------------------------------------------------------------------------- search
def _define(trial, arm, seeds):
    suggest(trial, arm, seeds)


class _PicklableLock:
    """A thread lock that pickles (as a new, unlocked lock). Optuna >= 5.1's NSGA-II sampler holds a plain
    lock, which Tune cannot pickle into tuner.pkl or the searcher's checkpoint."""

    def __init__(self):
        self._lock = threading.Lock()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._lock = threading.Lock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def acquire(self, *a, **kw):
        return self._lock.acquire(*a, **kw)

    def release(self):
        self._lock.release()


def _picklable(sampler):
    if hasattr(sampler, "_thread_lock"):
        sampler._thread_lock = _PicklableLock()
    return sampler


class ArmSearch(Searcher):
    """One Optuna study per arm behind one Tune searcher: every arm gets exactly `spec.arm_trials(arm)` trials
    (suggestions go to the arm with the fewest so far), each study sees only its own arm's results.

    Search design (issue 24): each arm's sampler has its own seed (plan.arm_seed: sweep seed × arm label), and its
    first space_filling_count(n) trials are scrambled-Sobol points of its space (plan.space_filling_points),
    enqueued into its study, so a small budget still covers the arm's whole range. They are NSGA-II's first
    generation (population = that count) or TPE's startup trials; the sampler proposes the rest."""

    def __init__(self, plan: Plan, metric, mode, storage_url: str, study_prefix: str):
        import functools

        import optuna
        from ray.tune.search.optuna import OptunaSearch
        super().__init__(metric=metric, mode=mode)
        spec = plan.spec
        self.plan, self.spec, self.owner, self.index = plan, spec, {}, {}
        self.counts = {a.label: 0 for a in spec.arms}
        self.budget = {a.label: spec.arm_trials(a) for a in spec.arms}
        self.subs = {}
        for a in spec.arms:
            seed = arm_seed(spec.seeds[0], a.label)
            start = space_filling_count(self.budget[a.label])
            sampler = _picklable(optuna.samplers.NSGAIISampler(population_size=max(2, min(50, start)), seed=seed)
                                 if spec.sampler == "nsga2" else
                                 optuna.samplers.TPESampler(seed=seed, n_startup_trials=start))
            self.subs[a.label] = OptunaSearch(
                space=functools.partial(_define, arm=a, seeds=spec.seeds), metric=metric, mode=mode,
                sampler=sampler, storage=optuna.storages.RDBStorage(storage_url),
                study_name=f"{study_prefix}/{a.label}",
                points_to_evaluate=space_filling_points(spec, a, start, seed) or None)

    def suggest(self, trial_id: str):
        label = self.owner.get(trial_id)
        if label is None:
            open_ = [a.label for a in self.spec.arms if self.counts[a.label] < self.budget[a.label]]
            if not open_:
                return self.FINISHED
            label = min(open_, key=lambda k: self.counts[k])
            self.counts[label] += 1
            self.owner[trial_id], self.index[trial_id] = label, self.counts[label]
        params = self.subs[label].suggest(trial_id)
        arm = next(a for a in self.spec.arms if a.label == label)
        # search_index: the trial's place in its arm's study (1, 2, ...), the order the saturation check reads
        return {"point": self.plan.optuna_point(arm, params, self.index.get(trial_id, 0)).to_tune()}

    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in self.owner:
            self.subs[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if trial_id in self.owner:
            self.subs[self.owner[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def close_orphan_optuna_trials(storage_url: str) -> int:
    """Optuna trials left RUNNING by a driver killed between `ask` and Ray's next checkpoint: no Ray trial will
    ever `tell` them (Ray suggests that point again under a new id), so they are marked FAIL."""
    import optuna
    storage = optuna.storages.RDBStorage(storage_url)
    n = 0
    for s in optuna.study.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            n += 1
    return n


def tune_config(plan: Plan, modes, concurrent: int, exp_dir: Path, points):
    spec = plan.spec
    if points is not None:  # Tune's own grid generator (it honours max_concurrent_trials; a passed one does not)
        return tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent, reuse_actors=True)
    metric = spec.objectives if len(spec.objectives) > 1 else spec.objectives[0]
    mode = modes if len(modes) > 1 else modes[0]
    exp_dir.mkdir(parents=True, exist_ok=True)
    search = ArmSearch(plan, metric, mode, f"sqlite:///{exp_dir / 'optuna.db'}", exp_dir.name)
    scheduler = None
    if spec.early_stop:
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(metric=metric, mode=mode, grace_period=1)
    # reuse_actors: a fresh actor pays seconds of imports (torch, Ray) per trial.
    return tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=search_total(spec, None),
                           max_concurrent_trials=concurrent, reuse_actors=True)


# ---------------------------------------------------------------------------------------------- progress
class TuneProgress(Progress, tune.Callback):
    """console.Progress as a Ray Tune callback."""
