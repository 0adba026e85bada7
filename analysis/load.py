"""MLflow store → one tidy DataFrame, one row per trial run (the MLflow layout of docs/architecture.md). Nothing here computes statistics.

Read from each trial run: tags `mlflow.parentRunId`, `stage` (search | confirm | ablation), `arm`, `config_key`,
`choice`, `status`, `diverged_reason`, `metric_name`, `higher_is_better`, `ablation_knob` (ablation runs: "n_ref" or
"ratio"); its params (TrialConfig fields that apply, `seed`, `profit`); the last value of its metrics
(FINAL_METRICS, every `profit_*`). From the parent (`profit_bench.role=sweep`) run: the tag `table`, the paper table
the sweep feeds; for the report's header and its pretraining section (`sweep_parents`, `pretrain_curves`) the tags
`suite`, `suite_command`, `git_commit`, `device_name`, the params `sweep.yaml`, `data_sizes`, `trials_per_arm`,
the metric `wall_time_s` and the metric histories `pretrain.<model>.seed<S>.old_val`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from profit_bench import UserError, protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the same default as profit_bench.sweep
TRIAL_FILTER = "tags.`profit_bench.role` = 'trial'"
SWEEP_FILTER = "tags.`profit_bench.role` = 'sweep'"
TAGS = ["stage", "arm", "config_key", "choice", "status", "diverged_reason", "metric_name", "higher_is_better",
        "ablation_knob", "search_index"]
STAGES = ("search", "confirm", "ablation")  # ablation: one knob of a PROFIT arm's confirmed knee varied at a time
PRETRAIN_KEY = re.compile(r"^pretrain\.(?P<model>.+)\.seed(?P<seed>-?\d+)\.old_val$")
FINAL_METRICS = [
    "old_val", "new_val", "old_val_loss", "new_val_loss", "old_test", "new_test", "old_test_loss", "new_test_loss",
    "old_val_before", "new_val_before", "old_test_before", "new_test_before", "new_val_loss_before", "forgetting_val",
    "forgetting_test", "chance_old", "chance_new", "peak_mem_bytes", "step_time_median_s", "train_time_s",
    "wall_time_s", "cpu_time_s", "n_trainable",
    "profit_state_bytes", "extra_state_bytes", "main_steps", "batches", "epochs_done"]
# Not hyperparameters: they do not change what is learned, so they never distinguish two configurations.
BOOKKEEPING = {"seed", "device", "dtype", "data_dir", "cache_dir", "eval_every", "compile", "ray_trial_id",
               "search_index", "sweep.yaml", "task", "model", "method", "optimizer", "profit", "steps", "limit"}
# (`epochs` is not bookkeeping: an arm may search its own epoch count, and then it tells configurations apart.)
SETTLED = ("ok", "diverged")  # statuses whose metrics exist; failed/killed runs are only counted


def _parse_param(col: pd.Series) -> pd.Series:
    """MLflow params are strings: "None" → missing, "True"/"False" → bool, numbers → floats."""
    s = col.where(~col.isin(["None", "null", ""]), None)
    present = s.dropna()
    if len(present) and present.isin(["True", "False"]).all():
        return s.map({"True": True, "False": False, None: None})
    num = pd.to_numeric(present, errors="coerce")
    if len(present) and num.notna().all():
        return pd.to_numeric(s, errors="coerce")
    return s


def method_label(method, optimizer, profit) -> str:
    """How a run fine-tuned: "full+adam", "PROFIT(adam)", "lora+PROFIT(adam)"; keys the paper's rows. `method` and
    `profit` as `methods.canonical` gives them (the registry's "profit" method is full with profit on)."""
    main = optimizer if isinstance(optimizer, str) and optimizer else "default"
    if profit is True and method == "full":
        return f"PROFIT({main})"
    return f"{method}+PROFIT({main})" if profit is True else f"{method}+{main}"


def open_client(uri: str):
    from mlflow.tracking import MlflowClient
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():  # MLflow would silently create an empty store here
        raise UserError(f"no MLflow store at {db}; run `python -m profit_bench.sweep NAME` in this folder first, "
                        f"or pass --tracking-uri")
    return MlflowClient(uri)


def load_runs(experiments: list[str] | None, tracking_uri: str | None = None, skip_empty: bool = False) -> pd.DataFrame:
    """Every trial run of `experiments` (default: all), tidied and with protocol divergence applied. A named
    experiment without trial runs is an error unless `skip_empty` (a suite whose later sweeps have not run yet)."""
    import mlflow
    uri = tracking_uri or DEFAULT_TRACKING_URI
    client = open_client(uri)
    mlflow.set_tracking_uri(uri)
    live = {e.name: e for e in client.search_experiments()}
    named = bool(experiments)
    experiments = experiments or [n for n in live if n != "Default"]
    missing = [n for n in experiments if n not in live]
    if missing:
        raise UserError(f"no experiment {', '.join(map(repr, missing))} in {uri} (found: "
                        f"{', '.join(sorted(live)) or 'none'}); run `python -m profit_bench.sweep "
                        f"{missing[0]}` first or pass the right --tracking-uri")
    frames = []
    for name in experiments:
        eid = live[name].experiment_id
        raw = mlflow.search_runs(experiment_ids=[eid], output_format="pandas", filter_string=TRIAL_FILTER)
        if raw.empty and named and not skip_empty:
            raise UserError(f"experiment {name!r} in {uri} has no trial runs; run `python -m profit_bench.sweep "
                            f"{name}` (or let it finish) first")
        if not raw.empty:
            parents = mlflow.search_runs(experiment_ids=[eid], output_format="pandas", filter_string=SWEEP_FILTER)
            frames.append(tidy_runs(raw.assign(experiment=name), parent_tables(parents)))
    if not frames:
        raise UserError(f"no trial runs in any experiment of {uri}; run `python -m profit_bench.sweep NAME` first "
                        f"or pass --tracking-uri")
    df = pd.concat(frames, ignore_index=True)
    if df["old_val"].isna().all() and (df["status"] == "ok").any():
        raise UserError(f"the runs of {', '.join(sorted(df['experiment'].unique()))} have no old_val metric: they "
                        f"predate the validation splits; run the sweep again with this version")
    return mark_divergence(df)


def parent_tables(parents: pd.DataFrame) -> dict[str, str]:
    """Parent run id → the paper table its sweep feeds ("" for none), from the parent's `table` tag."""
    if parents.empty or "tags.table" not in parents:
        return {}
    return dict(zip(parents["run_id"], parents["tags.table"].fillna("").astype(str)))


def _col(raw: pd.DataFrame, name: str, default=None) -> pd.Series:
    return raw[name] if name in raw else pd.Series(default, index=raw.index, dtype=object)


def tidy_runs(raw: pd.DataFrame, tables: dict[str, str]) -> pd.DataFrame:
    df = pd.DataFrame({"experiment": raw["experiment"].values, "run_id": raw["run_id"].values})
    for c in raw.columns:
        if c.startswith("params."):
            df[c[len("params."):]] = _parse_param(raw[c]).values
    for t in TAGS:
        df[t] = _col(raw, f"tags.{t}").values
    metrics = FINAL_METRICS + sorted({c[len("metrics."):] for c in raw if c.startswith("metrics.profit_")}
                                     - set(FINAL_METRICS))
    for m in metrics:
        # `batches` is a tag of a finished run (tracking.TAG_NUMBERS: no one-point chart), a metric in older stores
        df[m] = pd.to_numeric(_col(raw, f"metrics.{m}"), errors="coerce").fillna(
            pd.to_numeric(_col(raw, f"tags.{m}"), errors="coerce")).values
    df["parent_id"] = _col(raw, "tags.mlflow.parentRunId").values
    df["table"] = df["parent_id"].map(tables).fillna("").astype(str)
    df["stage"] = df["stage"].fillna("search")
    run_ok = raw["status"].map({"FINISHED": "ok", "RUNNING": "running"}).fillna("failed").values
    df["status"] = df["status"].fillna(pd.Series(run_ok, index=df.index))
    df.loc[raw["status"].isin(["FAILED", "KILLED"]).values & (df["status"] == "ok"), "status"] = "failed"
    df["metric_name"] = df["metric_name"].fillna("metric")
    df["higher_is_better"] = df["higher_is_better"].fillna(df["metric_name"] != "mse").astype(str).str.lower() \
        .isin(["true", "1"])
    for c in ("task", "model", "method", "optimizer", "profit"):  # groupby drops missing keys: name them instead
        df[c] = df[c].fillna("default") if c in df else "default"
    # The registry's view: a method registered with profit=True is its base method trained through PROFIT. Imported
    # here, not at the top: the registry loads torch and the model zoo (seconds), which the CLI's early checks
    # (an unreachable tracking server: one line, at once) must not wait for.
    from profit_bench.methods import canonical
    canon = [canonical(m, p is True) for m, p in zip(df["method"], df["profit"])]
    df["method"], df["profit"] = [m for m, _ in canon], [p for _, p in canon]
    df["label"] = [method_label(m, o, p) for m, o, p in zip(df["method"], df["optimizer"], df["profit"])]
    df["arm"] = df["arm"].fillna(df["label"])
    df["config_key"] = df["config_key"].fillna(df["run_id"])
    df["is_profit"] = df["profit"].astype(bool)
    return df


def mark_divergence(df: pd.DataFrame) -> pd.DataFrame:
    """protocol.mark_diverged per experiment × task × backbone (one sweep's median each): a finite explosion is
    `diverged` even where the sweep logged `ok`, and the sweep's own relative tags are re-derived."""
    # The analysis derives the relative rule afresh (protocol.py may have changed since the sweep tagged its
    # runs): a `diverged` tag with a reason came from that rule, unless the trial's own rule
    # (protocol.trial_divergence_reason, re-derived from its metrics) holds; one without came from the trial.
    df = df.copy()
    own = pd.Series([protocol.trial_divergence_reason(a, b) is not None for a, b in
                     zip(df.get("new_val_loss", pd.Series(float("nan"), index=df.index)),
                         df.get("new_val_loss_before", pd.Series(float("nan"), index=df.index)))], index=df.index,
                    dtype=bool)
    relative = (df["status"] == "diverged") & df["diverged_reason"].notna() & ~own
    df.loc[relative, "status"] = "ok"
    df.loc[relative, "diverged_reason"] = None
    parts = []
    for _, g in df.groupby(["experiment", "task", "model"], sort=False):
        settled = g["status"].isin(SETTLED)
        marked = protocol.mark_diverged(g[settled], bool(g["higher_is_better"].iloc[0]))
        g = g.copy()
        bad = marked.index[marked["diverged"]]
        g.loc[bad, "status"] = "diverged"
        g.loc[bad, "diverged_reason"] = g.loc[bad, "diverged_reason"].fillna(marked.loc[bad, "diverged_reason"])
        parts.append(g)
    out = pd.concat(parts).sort_index()
    out["diverged"] = out["status"] == "diverged"
    return out


def param_columns(df: pd.DataFrame) -> list[str]:
    """Every column that can hold a hyperparameter (not bookkeeping, a tag, a metric or a derived column)."""
    known = set(BOOKKEEPING) | set(TAGS) | set(FINAL_METRICS) | {
        "experiment", "run_id", "parent_id", "table", "label", "is_profit", "diverged"}
    return sorted(c for c in df.columns if c not in known and not c.startswith("profit_"))


def hyper_columns(df: pd.DataFrame) -> list[str]:
    """Params that vary within some arm of these runs' search and confirm stages: they tell two configurations of
    one arm apart (an ablation run varies a knob of a confirmed configuration, shown in its own section, and does
    not make the knob part of every other configuration's text). Sorted by name: MLflow's column order depends on
    which run was read first, and the report must not."""
    df = df[df["stage"] != "ablation"] if "stage" in df else df
    cand = param_columns(df)
    return sorted(c for c in cand if (df.groupby("arm")[c].agg(lambda s: s.astype(str).nunique()) > 1).any())


def metric_histories(run_ids: dict[str, str], tracking_uri: str | None, keys) -> pd.DataFrame:
    """Per-evaluation values of `keys` for the named runs: columns run, key, step, value. Where a step holds two
    values (the last evaluation and the final result both logged there), the evaluation's, logged first, wins."""
    client = open_client(tracking_uri or DEFAULT_TRACKING_URI)
    rows = [dict(run=name, key=k, step=m.step, value=m.value, t=m.timestamp)
            for name, rid in run_ids.items() for k in keys for m in client.get_metric_history(rid, k)]
    df = pd.DataFrame(rows, columns=["run", "key", "step", "value", "t"]).sort_values(["run", "key", "step", "t"],
                                                                                      kind="stable")
    return df.drop_duplicates(["run", "key", "step"]).drop(columns="t").reset_index(drop=True)


NOT_DIAGNOSTICS = {"profit_state_bytes", "profit_memory"}  # a cost metric and a param that share the prefix


def profit_metric_keys(df: pd.DataFrame) -> list[str]:
    """PROFIT's diagnostics (profit_bench.optim.DIAGNOSTICS) present in these runs."""
    return sorted(c for c in df.columns if c.startswith("profit_") and c not in NOT_DIAGNOSTICS
                  and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any())


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.number)) and np.isfinite(v)


# ---------------------------------------------------------------------------------------------- sweep parents
def sweep_parents(experiments: list[str], tracking_uri: str | None = None) -> pd.DataFrame:
    """The sweep parent runs of `experiments` as MLflow's frame (columns tags.*, params.*, metrics.*) plus
    `experiment`, newest first within each experiment (an experiment can hold several sweeps)."""
    import mlflow
    uri = tracking_uri or DEFAULT_TRACKING_URI
    client = open_client(uri)
    mlflow.set_tracking_uri(uri)
    live = {e.name: e.experiment_id for e in client.search_experiments()}
    frames = [mlflow.search_runs(experiment_ids=[live[n]], output_format="pandas", filter_string=SWEEP_FILTER)
              .assign(experiment=n) for n in experiments if n in live]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["experiment", "run_id", "start_time"])
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["experiment", "start_time"], ascending=[True, False], kind="stable").reset_index(drop=True)


def latest_parents(parents: pd.DataFrame) -> pd.DataFrame:
    """One row per experiment: its newest sweep parent."""
    return parents.drop_duplicates("experiment").set_index("experiment") if len(parents) else \
        pd.DataFrame(columns=parents.columns).set_index("experiment")


def suite_experiments(suite: str, tracking_uri: str | None = None) -> list[str]:
    """Every experiment whose latest sweep parent carries the tag `suite=<suite>`, sorted."""
    uri = tracking_uri or DEFAULT_TRACKING_URI
    client = open_client(uri)
    names = [e.name for e in client.search_experiments() if e.name != "Default"]
    latest = latest_parents(sweep_parents(names, uri))
    tag = latest["tags.suite"] if "tags.suite" in latest else pd.Series(dtype=object)
    found = sorted(tag[tag == suite].index)
    if not found:
        known = sorted(set(tag.dropna().astype(str)))
        raise UserError(f"no experiment in {uri} whose latest sweep carries the tag suite={suite} (suites found: "
                        f"{', '.join(known) or 'none'}); run the suite first or pass the right --tracking-uri")
    return found


def parent_value(parent, column: str):
    """A parent row's tag/param/metric (`tags.X`, `params.X`, `metrics.X`), None when absent or empty."""
    if parent is None or column not in parent.index:
        return None
    v = parent[column]
    if v is None or (isinstance(v, float) and not np.isfinite(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


def sweep_yaml(parent) -> dict:
    """The resolved spec the sweep ran (param `sweep.yaml`), {} when absent or unreadable."""
    import yaml
    text = parent_value(parent, "params.sweep.yaml")
    try:
        out = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        return {}
    return out if isinstance(out, dict) else {}


def data_sizes(parent) -> dict:
    """The parent's `data_sizes` param: split → number of examples, {} when absent or unreadable."""
    text = parent_value(parent, "params.data_sizes")
    try:
        out = json.loads(text) if text else {}
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def pretrain_curves(parents: pd.DataFrame, tracking_uri: str | None = None) -> pd.DataFrame:
    """Old-task validation curves of the pretrained checkpoints, from the parents' metric histories
    `pretrain.<model>.seed<S>.old_val` (step = evaluation index): columns experiment, model, seed, step, value.
    A (model, seed) logged by several sweeps of one experiment is read from the newest."""
    cols = ["experiment", "model", "seed", "step", "value"]
    keys = [c[len("metrics."):] for c in parents.columns
            if c.startswith("metrics.") and PRETRAIN_KEY.match(c[len("metrics."):])] if len(parents) else []
    if not keys:
        return pd.DataFrame(columns=cols)
    parts = []
    for exp, g in parents.groupby("experiment", sort=True):
        seen = set()
        for _, p in g.iterrows():  # newest first
            mine = [k for k in keys if k not in seen and finite(p.get(f"metrics.{k}"))]
            seen |= set(mine)
            if not mine:
                continue
            h = metric_histories({exp: p["run_id"]}, tracking_uri, mine)
            m = h["key"].str.extract(PRETRAIN_KEY)
            parts.append(pd.DataFrame({"experiment": exp, "model": m["model"], "seed": m["seed"].astype(int),
                                       "step": h["step"], "value": h["value"]}))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)
