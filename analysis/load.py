"""MLflow store → one tidy DataFrame, one row per trial run (CONTRACT §3 layout). Nothing here computes statistics.

Read from each trial run: tags `mlflow.parentRunId`, `stage`, `arm`, `config_key`, `choice`, `status`,
`diverged_reason`, `metric_name`, `higher_is_better`; its params (TrialConfig fields that apply, `seed`, `profit`);
the last value of its metrics (FINAL_METRICS, every `profit_*`). From the parent (`profit_bench.role=sweep`) run:
the tag `table`, the paper table the sweep feeds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from profit_bench import UserError, protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the same default as profit_bench.sweep
TRIAL_FILTER = "tags.`profit_bench.role` = 'trial'"
SWEEP_FILTER = "tags.`profit_bench.role` = 'sweep'"
TAGS = ["stage", "arm", "config_key", "choice", "status", "diverged_reason", "metric_name", "higher_is_better"]
FINAL_METRICS = [
    "old_val", "new_val", "old_val_loss", "new_val_loss", "old_test", "new_test", "old_test_loss", "new_test_loss",
    "old_val_before", "new_val_before", "old_test_before", "new_test_before", "forgetting_val", "forgetting_test",
    "chance_old", "chance_new", "peak_mem_bytes", "step_time_median_s", "wall_time_s", "n_trainable",
    "profit_state_bytes", "extra_state_bytes", "main_steps"]
# Not hyperparameters: they do not change what is learned, so they never distinguish two configurations.
BOOKKEEPING = {"seed", "device", "dtype", "data_dir", "cache_dir", "eval_every", "compile", "ray_trial_id",
               "sweep.yaml", "task", "model", "method", "optimizer", "profit", "steps", "epochs", "limit"}
ADAPTERS = {"lora", "vpt", "convadapter"}
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
    """How a run fine-tuned: "full+adam", "PROFIT(adam)", "lora+PROFIT(adam)"; keys the paper's rows."""
    main = optimizer if isinstance(optimizer, str) and optimizer else "default"
    if method == "profit" or (profit is True and method == "full"):
        return f"PROFIT({main})"
    return f"{method}+PROFIT({main})" if profit is True else f"{method}+{main}"


def is_profit_label(label: str) -> bool:
    return "PROFIT(" in label


def open_client(uri: str):
    from mlflow.tracking import MlflowClient
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    if db is not None and not Path(db).is_file():  # MLflow would silently create an empty store here
        raise UserError(f"no MLflow store at {db}; run `python -m profit_bench.sweep NAME` in this folder first, "
                        f"or pass --tracking-uri")
    return MlflowClient(uri)


def load_runs(experiments: list[str] | None, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every trial run of `experiments` (default: all), tidied and with protocol divergence applied."""
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
        if raw.empty and named:
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
        df[m] = pd.to_numeric(_col(raw, f"metrics.{m}"), errors="coerce").values
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
    df["label"] = [method_label(m, o, p) for m, o, p in zip(df["method"], df["optimizer"], df["profit"])]
    df["arm"] = df["arm"].fillna(df["label"])
    df["config_key"] = df["config_key"].fillna(df["run_id"])
    df["is_profit"] = df["label"].map(is_profit_label).astype(bool)
    return df


def mark_divergence(df: pd.DataFrame) -> pd.DataFrame:
    """protocol.mark_diverged per experiment × task × backbone (one sweep's median each): a finite explosion is
    `diverged` even where the sweep logged `ok`, and the sweep's own relative tags are re-derived."""
    # The analysis derives the relative rule afresh (protocol.py may have changed since the sweep tagged its
    # runs): a `diverged` tag with a reason came from that rule; one without came from the trial (non-finite).
    df = df.copy()
    relative = (df["status"] == "diverged") & df["diverged_reason"].notna()
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


def hyper_columns(df: pd.DataFrame) -> list[str]:
    """Params that vary within some arm of these runs: they tell two configurations of one arm apart. Sorted by
    name: MLflow's column order depends on which run was read first, and the report must not."""
    known = set(BOOKKEEPING) | set(TAGS) | set(FINAL_METRICS) | {
        "experiment", "run_id", "parent_id", "table", "label", "is_profit", "diverged"}
    cand = [c for c in df.columns if c not in known and not c.startswith("profit_")]
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
    """PROFIT's diagnostics (CONTRACT §4) present in these runs."""
    return sorted(c for c in df.columns if c.startswith("profit_") and c not in NOT_DIAGNOSTICS
                  and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any())


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float, np.number)) and np.isfinite(v)
