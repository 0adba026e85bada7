"""Statistics of the report: selection on validation (via profit_bench.protocol), confirmed cells (mean ± s.e.,
95 % t-interval, n), paired PROFIT − baseline differences per seed, hypervolume with a bootstrap CI over seeds,
the ablations around a PROFIT arm's confirmed knee, and the pretrained backbones' validation curves.

A *cell* is one confirmed configuration: the stage=confirm runs of one experiment × task × backbone × arm ×
config_key, over the confirmation seeds. Only settled, non-diverged runs enter a cell; the rest are counted.
Stages: `search` feeds selection only, `confirm` the cells, the paired differences and the hypervolumes, and
`ablation` (one knob of the knee varied on confirmation seeds) only `ablation_cells`.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.stats

from profit_bench import protocol

LEVEL = 0.95
GROUP = ["experiment", "task", "model"]
CELL_KEYS = GROUP + ["arm", "config_key"]
CELL_METRICS = ["old_test", "new_test", "old_test_before", "new_test_before", "forgetting_test", "gain_test",
                "old_val", "new_val", "step_time_median_s", "peak_mem_bytes", "batches", "main_steps"]
N_BOOT = 1000


class Stat(NamedTuple):
    mean: float
    se: float
    lo: float
    hi: float
    n: int


def mean_ci(values, level: float = LEVEL) -> Stat:
    """Mean, standard error (ddof=1) and the two-sided t-interval over the finite values; s.e./CI NaN for n < 2."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if n < 2:
        return Stat(m, math.nan, math.nan, math.nan, 1)
    se = float(v.std(ddof=1) / math.sqrt(n))
    half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return Stat(m, se, m - half, m + half, n)


def paired_difference(a, b, level: float = LEVEL) -> Stat:
    """Mean of a_i − b_i over the pairs where both are finite, with its t-interval (a paired t-test's CI)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return mean_ci(a - b, level)


def excludes_zero(s: Stat) -> bool:
    return s.n >= 2 and (s.lo > 0 or s.hi < 0)


BETTER, TIE, WORSE = "PROFIT better", "not separated", "PROFIT worse"
ALPHA = 0.05   # two-sided, per comparison before Holm's adjustment
POWER = 0.80   # for the minimum detectable difference

MULTIPLICITY_RULE = (
    f"Each paired comparison is a two-sided paired t-test of PROFIT − baseline over the confirmation seeds; the "
    f"report's whole family of comparisons (every group, baseline, choice, old and new test) is adjusted with "
    f"Holm's step-down method, so the chance of any false separation stays ≤ {ALPHA:g}. A verdict is "
    f"'{BETTER}' / '{WORSE}' when the Holm-adjusted p < {ALPHA:g}, else '{TIE}' (which is not 'equal': see the "
    f"detectable difference). MDD = the minimum detectable difference: the true mean difference a paired t-test at "
    f"this n and this comparison's spread (s.d. of the per-seed differences) finds with {POWER:.0%} power at "
    f"α = {ALPHA:g} two-sided, unadjusted (exact, noncentral t); Holm's adjustment only makes it larger.")


def paired_p(s: Stat) -> float:
    """Two-sided paired t-test p-value of a paired_difference Stat (t = mean / s.e., n − 1 df); NaN for n < 2.
    Identical differences (s.e. 0) give p = 0 when they are not 0, else 1."""
    if s.n < 2 or not np.isfinite(s.mean):
        return math.nan
    if not s.se > 1e-12 * max(1.0, abs(s.mean)):
        return 0.0 if s.mean != 0 else 1.0
    return float(2 * scipy.stats.t.sf(abs(s.mean / s.se), s.n - 1))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted in the family): sort the m
    p-values, multiply the k-th smallest by (m − k + 1), take the running maximum, cap at 1."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def min_detectable(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest true mean difference a two-sided paired t-test (n pairs, per-pair s.d. `sd`) detects with
    `power` at level `alpha`: solves P(|T| > t_crit) = power for T ~ noncentral t(n − 1, δ √n / sd)."""
    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df = n - 1
    crit = scipy.stats.t.ppf(1 - alpha / 2, df)

    def gap(nc):
        got = scipy.stats.nct.sf(crit, df, nc) + scipy.stats.nct.cdf(-crit, df, nc)
        return (got if np.isfinite(got) else 1.0) - power  # far out scipy's nct returns NaN: power is 1 there

    hi = 1.0
    while gap(hi) < 0 and hi < 1e4:
        hi *= 2
    nc = scipy.optimize.brentq(gap, 0.0, hi)
    return float(nc * sd / math.sqrt(n))


def verdict(s: Stat, higher_is_better: bool, p_adjusted: float | None = None) -> str | None:
    """A PROFIT − baseline difference read in the metric's direction: BETTER / WORSE when separated, TIE ("not
    separated") otherwise, None without an interval (n < 2). Separated: the Holm-adjusted p < ALPHA when
    `p_adjusted` is given, else the raw 95 % interval excludes 0 (the unadjusted reading)."""
    if s.n < 2:
        return None
    separated = (p_adjusted < ALPHA) if p_adjusted is not None and np.isfinite(p_adjusted) else excludes_zero(s)
    if not separated:
        return TIE
    return BETTER if (s.mean > 0) == bool(higher_is_better) else WORSE


def adjust_family(paired: list[dict], metrics=("old_test", "new_test")) -> list[dict]:
    """Adds to every paired row, per metric m: m_p (raw), m_p_holm (Holm over the whole list × metrics), m_sd (s.d.
    of the per-seed differences), m_mdd (min_detectable at its n) and m_mdd10 (at 10 seeds, same s.d.)."""
    keys = [(i, m) for i, _ in enumerate(paired) for m in metrics]
    raw = [paired_p(paired[i][m]) for i, m in keys]
    for (i, m), p, q in zip(keys, raw, holm(raw)):
        st = paired[i][m]
        sd = st.se * math.sqrt(st.n) if st.n >= 2 else math.nan
        paired[i].update({f"{m}_p": p, f"{m}_p_holm": q, f"{m}_sd": sd, f"{m}_mdd": min_detectable(sd, st.n),
                          f"{m}_mdd10": min_detectable(sd, 10)})
    return paired


# ---------------------------------------------------------------------------------------------- formatting
def scale_of(metric: str) -> tuple[float, str]:
    """Accuracy prints in percent (ours are fractions), anything else with 4 significant digits."""
    return (100.0, ".2f") if metric == "accuracy" else (1.0, ".4g")


def fmt_num(v, metric: str = "mse") -> str:
    if v is None or not np.isfinite(v):
        return "—"
    scale, spec = scale_of(metric)
    return format(v * scale, spec)


def fmt_stat(s: Stat, metric: str = "mse") -> str:
    """A table cell: "m ± se"; n = 1 prints "m" (never "± nan"); no value prints "—". The 95 % interval goes in a
    column of its own (fmt_ci) and n in the header or its own column (fmt_n): cells stay short."""
    if s.n == 0:
        return "—"
    if s.n == 1:
        return fmt_num(s.mean, metric)
    se = 0.0 if s.se < 1e-12 * max(1.0, abs(s.mean)) else s.se  # identical values: float noise, not spread
    return f"{fmt_num(s.mean, metric)} ± {fmt_num(se, metric)}"


def fmt_ci(s: Stat, metric: str = "mse") -> str:
    """The 95 % t-interval "[lo, hi]" of `s`; "—" below two values (no interval)."""
    return f"[{fmt_num(s.lo, metric)}, {fmt_num(s.hi, metric)}]" if s.n >= 2 else "—"


def fmt_n(*stats: Stat) -> str:
    """The n of a row's statistics: "5", or "5/4" when they differ (a metric missing on some runs)."""
    ns = list(dict.fromkeys(s.n for s in stats))
    return "/".join(map(str, ns)) if ns else "0"


def stat_ci(s: Stat, metric: str = "mse") -> list[str]:
    """The two cells of a statistic with its interval: mean ± s.e., then the 95 % CI."""
    return [fmt_stat(s, metric), fmt_ci(s, metric)]


# ---------------------------------------------------------------------------------------------- selection
def selection(runs: pd.DataFrame) -> pd.DataFrame:
    """The report's own selection, from search-stage validation metrics only (protocol.confirm_choices), per
    experiment × task × backbone: arm, config_key, choice, old_val, new_val."""
    parts = []
    search = runs[(runs["stage"] == "search") & (runs["status"] == "ok")]
    for key, g in search.groupby(GROUP, sort=True):
        chosen = merge_choices(protocol.confirm_choices(g, bool(g["higher_is_better"].iloc[0]), arm_col="arm"))
        if not chosen.empty:
            parts.append(chosen[["arm", "config_key", "choice", "old_val", "new_val"]].assign(**dict(zip(GROUP, key))))
    cols = GROUP + ["arm", "config_key", "choice", "old_val", "new_val"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def merge_choices(chosen: pd.DataFrame) -> pd.DataFrame:
    """One row per config_key: with several search seeds, two roles can pick two seeds of one configuration
    (one confirmation of it, under both names)."""
    if chosen.empty:
        return chosen
    names = chosen.groupby("config_key", sort=False)["choice"].agg(
        lambda s: ",".join(sorted({c for x in s for c in x.split(",")}, key=choice_order)))
    first = chosen.drop_duplicates("config_key").set_index("config_key")
    return first.assign(choice=names).reset_index()


# ---------------------------------------------------------------------------------------------- cells
def with_gain(runs: pd.DataFrame) -> pd.DataFrame:
    """`gain_test`: new-task improvement over the pretrained model, signed so positive = better."""
    sign = np.where(runs["higher_is_better"], 1.0, -1.0)
    return runs.assign(gain_test=sign * (runs["new_test"] - runs["new_test_before"]))


def confirmed_cells(runs: pd.DataFrame, hyper: list[str], chosen: pd.DataFrame,
                    extra_metrics: list[str] = ()) -> pd.DataFrame:
    """One row per confirmed configuration: identity, hyperparameters, choice, and for every metric m the
    columns m (mean), m_stat (Stat); `n` good runs, `n_bad` diverged/failed, `seeds`."""
    conf = with_gain(runs[runs["stage"] == "confirm"])
    rows = []
    for key, g in conf.groupby(CELL_KEYS, sort=True):
        ok = g[g["status"] == "ok"]
        first = g.iloc[0]
        row = dict(zip(CELL_KEYS, key))
        row.update({c: first[c] for c in ["label", "method", "optimizer", "profit", "is_profit", "metric_name",
                                          "higher_is_better", "table"] + hyper if c in g})
        row.update(n=len(ok), n_bad=len(g) - len(ok), seeds=sorted(ok["seed"].astype(int)), run_ids=list(ok["run_id"]),
                   choice=_choice(g, chosen, key))
        for m in list(CELL_METRICS) + list(extra_metrics):
            st = mean_ci(pd.to_numeric(ok[m], errors="coerce")) if m in ok else mean_ci([])
            row[m], row[m + "_stat"] = st.mean, st
        rows.append(row)
    return pd.DataFrame(rows)


def _choice(g: pd.DataFrame, chosen: pd.DataFrame, key) -> str:
    """The confirm runs' `choice` tag, else the report's own selection of that config_key, else "—"."""
    tag = g["choice"].dropna()
    if len(tag):
        return ",".join(sorted(str(tag.iloc[0]).split(","), key=choice_order))
    hit = chosen[(chosen[CELL_KEYS[:-1]].astype(str).values == np.array(key[:-1], dtype=str)).all(axis=1)
                 & (chosen["config_key"] == key[-1])] if len(chosen) else chosen
    return str(hit["choice"].iloc[0]) if len(hit) else "—"


def choice_order(choice: str) -> int:
    """Rows sort best-old, knee, best-new (the front from the old task's end to the new task's)."""
    return min((["best-old", "knee", "best-new"].index(c) for c in str(choice).split(",")
                if c in ("best-old", "knee", "best-new")), default=3)


# ---------------------------------------------------------------------------------------------- paired
def rows_of(df: pd.DataFrame, cols: list[str], values) -> pd.DataFrame:
    """The rows of `df` whose `cols` equal `values` (a GROUP or CELL_KEYS key); an empty frame stays as it is."""
    return df[(df[cols] == pd.Series(list(values), index=cols)).all(axis=1)] if len(df) else df


def comparison_pairs(cells: pd.DataFrame):
    """(group key, PROFIT cell, baseline cell, shared choice) for every comparison the report makes: a PROFIT arm vs
    each baseline arm of the same experiment × task × backbone, matched by selection choice (PROFIT's knee vs the
    baseline's knee, ...). An adapter trained through PROFIT (LoRA, VPT, ConvAdapter + PROFIT: Table 7) is
    compared with the same adapter only; PROFIT on the whole model with every baseline."""
    for key, c in cells.groupby(GROUP, sort=True) if len(cells) else ():
        for _, p in c[c["is_profit"]].iterrows():
            for _, b in c[~c["is_profit"]].iterrows():
                if "method" in c and p["method"] != "full" and p["method"] != b["method"]:
                    continue
                shared = set(str(p["choice"]).split(",")) & set(str(b["choice"]).split(","))
                if shared:
                    yield key, p, b, ",".join(sorted(shared, key=choice_order))


def _pair_row(key, p, b, choice, seeds) -> dict:
    return dict(zip(GROUP, key), profit=p["arm"], baseline=b["arm"], baseline_method=b.get("method"),
                baseline_optimizer=b.get("optimizer"), choice=choice, seeds=seeds, metric_name=p["metric_name"],
                higher_is_better=bool(p["higher_is_better"]))


def paired_rows(runs: pd.DataFrame, cells: pd.DataFrame) -> list[dict]:
    """Every comparison_pairs comparison matched by confirmation seed (same backbone, same data order).
    Differences are PROFIT − baseline in the metric's own units, for old_test and new_test."""
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    out = []
    for key, p, b, choice in comparison_pairs(cells):
        mine = rows_of(conf, GROUP, key)
        pr = per_seed(mine, p["config_key"], ["old_test", "new_test"])
        br = per_seed(mine, b["config_key"], ["old_test", "new_test"])
        seeds = sorted(set(pr.index) & set(br.index))
        row = _pair_row(key, p, b, choice, seeds)
        for m in ("old_test", "new_test"):
            row[m] = paired_difference(pr.loc[seeds, m], br.loc[seeds, m]) if seeds else mean_ci([])
        out.append(row)
    return adjust_family(out)


# ---------------------------------------------------------------------------------------------- equal updates
EQUAL_UPDATES_RULE = (
    "A secondary view beside the equal-data headline: each paired comparison read at an equal number of "
    "main-optimizer updates. Per confirmation seed, the count is the smaller of the two runs' final main-update "
    "counts (a PROFIT main update closes n_ref reference batches + 1, so PROFIT usually makes fewer); each run's "
    "validation metrics are read at its first evaluation at or past that count (evaluations come once per epoch, "
    "or every eval_every main steps, so a run may be read a little past it: both reading points are shown). "
    "Validation metrics of the confirmation runs, because test is measured only at the end of a run; the run with "
    "more updates is read mid-run (its lr schedule not finished), not a run trained for that budget. Holm over this "
    "view's own family; the headline's verdicts are the equal-data ones.")


def updates_curve(hist: pd.DataFrame) -> pd.DataFrame:
    """One run's per-evaluation rows (columns key, step, value) as a table indexed by step with columns
    main_steps, old_val, new_val: only evaluations that logged main_steps (the pretrained step-0 point has none)."""
    t = hist.pivot_table(index="step", columns="key", values="value", aggfunc="first").sort_index()
    if "main_steps" not in t:
        return pd.DataFrame(columns=["main_steps", "old_val", "new_val"])
    return t[t["main_steps"].notna()].reindex(columns=["main_steps", "old_val", "new_val"])


def at_updates(curve: pd.DataFrame, target: float) -> pd.Series | None:
    """The first evaluation of `curve` (updates_curve) whose main_steps reached `target`, or None."""
    hit = curve[curve["main_steps"] >= target]
    return hit.iloc[0] if len(hit) else None


def equal_update_rows(runs: pd.DataFrame, cells: pd.DataFrame, histories: pd.DataFrame) -> list[dict]:
    """EQUAL_UPDATES_RULE for every comparison_pairs comparison. `histories`: per-evaluation metrics of the
    confirmation runs (columns run = run_id, key in main_steps / old_val / new_val, step, value). Each row: the
    pair's identity, `updates` (Stat of the per-seed equal count), `read_profit` / `read_baseline` (mean
    main_steps where each was read), `equal_ends` (both runs ended at the same count on every seed: the headline
    already compares them at equal updates; left out of the Holm family), and old_val / new_val as paired differences (PROFIT − baseline) with
    adjust_family's p, Holm p, MDD. Pairs without per-evaluation main_steps are left out."""
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    curves = {rid: updates_curve(h) for rid, h in histories.groupby("run")} if len(histories) else {}
    out = []
    for key, p, b, choice in comparison_pairs(cells):
        mine = rows_of(conf, GROUP, key)
        first = {side: mine[mine["config_key"] == c["config_key"]].drop_duplicates("seed").set_index("seed")
                 for side, c in (("p", p), ("b", b))}
        reads = []  # per seed: (count, PROFIT reading, baseline reading)
        for seed in sorted(set(first["p"].index) & set(first["b"].index)):
            cp, cb = (curves.get(first[s].loc[seed, "run_id"]) for s in ("p", "b"))
            if cp is None or cb is None or cp.empty or cb.empty:
                continue
            ends = cp["main_steps"].max(), cb["main_steps"].max()
            reads.append((seed, min(ends), at_updates(cp, min(ends)), at_updates(cb, min(ends)), ends[0] == ends[1]))
        if not reads:
            continue
        row = _pair_row(key, p, b, choice, [r[0] for r in reads])
        row.update(updates=mean_ci([r[1] for r in reads]), equal_ends=all(r[4] for r in reads),
                   read_profit=float(np.mean([r[2]["main_steps"] for r in reads])),
                   read_baseline=float(np.mean([r[3]["main_steps"] for r in reads])))
        for m in ("old_val", "new_val"):
            row[m] = paired_difference([r[2][m] for r in reads], [r[3][m] for r in reads])
        out.append(row)
    adjust_family([r for r in out if not r["equal_ends"]], metrics=("old_val", "new_val"))  # the shown family
    return out


def per_seed(conf: pd.DataFrame, config_key: str, cols: list[str]) -> pd.DataFrame:
    """A configuration's confirmation runs indexed by seed (a seed run twice counts once, as its mean)."""
    return conf[conf["config_key"] == config_key].groupby("seed")[cols].mean()


# ---------------------------------------------------------------------------------------------- hypervolume
def test_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Confirm runs with test columns under the validation names protocol.reference_point reads."""
    conf = runs[runs["stage"] == "confirm"]
    return pd.DataFrame({"old_val": conf["old_test"], "new_val": conf["new_test"],
                         "old_val_before": conf["old_test_before"], "new_val_before": conf["new_test_before"],
                         "diverged": conf["status"] != "ok"})


def chance(runs: pd.DataFrame) -> tuple | None:
    vals = [pd.to_numeric(runs.get(c), errors="coerce").median() if c in runs else math.nan
            for c in ("chance_old", "chance_new")]
    return tuple(None if not np.isfinite(v) else float(v) for v in vals)


def test_reference(runs: pd.DataFrame) -> tuple[float, float]:
    """Hypervolume corner of one group's confirmed fronts: pretrained and worst non-diverged confirm runs, and
    chance for accuracy (protocol.reference_point on test columns)."""
    return protocol.reference_point(test_frame(runs), bool(runs["higher_is_better"].iloc[0]), chance(runs))


def val_reference(runs: pd.DataFrame) -> tuple[float, float]:
    search = runs[runs["stage"] == "search"].assign(diverged=lambda d: d["status"] != "ok")
    return protocol.reference_point(search, bool(runs["higher_is_better"].iloc[0]), chance(runs))


def hypervolume_ci(runs: pd.DataFrame, cells: pd.DataFrame, ref, rng_seed: int = 0) -> dict[str, tuple]:
    """Per arm: hypervolume of its confirmed cell means (test) against `ref`, and a percentile bootstrap CI
    over confirmation seeds (one resample of seeds per replicate, shared by the arm's cells); (hv, lo, hi, n)."""
    hib = bool(cells["higher_is_better"].iloc[0])
    dirs = (hib, hib)
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    rng = np.random.default_rng(rng_seed)
    out = {}
    for arm, c in cells.groupby("arm", sort=True):
        per_cell = [per_seed(conf, k, ["old_test", "new_test"]) for k in c["config_key"]]
        seeds = sorted(set().union(*(set(p.index) for p in per_cell)))
        hv = protocol.hypervolume(c[["old_test", "new_test"]].to_numpy(float), ref, dirs)
        if len(seeds) < 2:
            out[arm] = (hv, math.nan, math.nan, len(seeds))
            continue
        table = np.stack([p.reindex(seeds).to_numpy(float) for p in per_cell])  # cells × seeds × 2, NaN = absent
        idx = rng.integers(0, len(seeds), size=(N_BOOT, len(seeds)))
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample that misses every seed of a cell
            means = np.nanmean(table[:, idx], axis=2)  # cells × replicates × 2
        reps = [protocol.hypervolume(means[:, r], ref, dirs) for r in range(N_BOOT)]
        lo, hi = np.percentile(reps, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
        out[arm] = (hv, float(lo), float(hi), len(seeds))
    return out


# ---------------------------------------------------------------------------------------------- ablations
ABLATION_STAGE = "ablation"
ABLATION_KNOBS = ("n_ref", "ratio")
DIAG_FRAC = "profit_projected_frac"


def knee_runs(runs: pd.DataFrame, cells: pd.DataFrame, key, arm: str) -> pd.DataFrame:
    """Every confirm run (any status) of `arm`'s knee configuration in group `key`: the cell whose choice names
    the knee (the confirm runs' `choice` tag, else the report's own selection)."""
    if not len(cells):
        return runs.iloc[:0]
    mine = (cells[GROUP].astype(str).values == np.array(key, dtype=str)).all(axis=1) & (cells["arm"] == arm).values
    knee = cells[mine & cells["choice"].astype(str).str.split(",").map(lambda c: "knee" in c).values]
    conf = runs[(runs["stage"] == "confirm") & (runs["arm"] == arm)
                & (runs[GROUP].astype(str).values == np.array(key, dtype=str)).all(axis=1)]
    return conf[conf["config_key"].isin(set(knee["config_key"]))]


def _ablation_point(g: pd.DataFrame, value, is_knee: bool, metrics: list[str]) -> dict:
    """One knob value: per confirmation seed the mean of its ok runs (a seed run twice counts once), then
    mean_ci over seeds for each metric; runs not ok are counted in n_bad."""
    ok = g[g["status"] == "ok"]
    per = ok.groupby("seed")[metrics].mean() if len(ok) else pd.DataFrame(columns=metrics)
    row = dict(value=value, knee=is_knee, n=len(per), n_bad=int(len(g) - len(ok)),
               seeds=sorted(int(x) for x in per.index))
    for m in metrics:
        row[m] = mean_ci(per[m]) if m in per else mean_ci([])
    return row


def ablation_cells(runs: pd.DataFrame, cells: pd.DataFrame, params: list[str]) -> list[dict]:
    """Per experiment × task × backbone × PROFIT arm × knob (the `ablation_knob` tag): one point per knob value
    of the stage=ablation runs, plus the confirmed knee (its confirm runs, not re-run in the ablation stage) on
    the ablation's seeds, sorted by value. Test metrics, mean ± s.e. [95 % t-CI] over confirmation seeds.
    `differ` lists the other `params` (load.param_columns) in which the ablation runs differ from the knee
    (none, by the sweep's contract)."""
    abl = runs[runs["stage"] == ABLATION_STAGE]
    metrics = ["old_test", "new_test"] + ([DIAG_FRAC] if DIAG_FRAC in runs and runs[DIAG_FRAC].notna().any() else [])
    out = []
    if abl.empty or "ablation_knob" not in abl:
        return out
    for (*key, arm, knob), a in abl.groupby(GROUP + ["arm", "ablation_knob"], sort=True):
        if knob not in a:
            continue
        knee = knee_runs(runs, cells, tuple(key), arm)
        seeds = set(a["seed"].dropna().astype(int))
        knee_on = knee[knee["seed"].astype(int).isin(seeds)]
        points = [_ablation_point(v, value, False, metrics) for value, v in a.groupby(knob, sort=True)]
        knee_value = knee[knob].dropna().iloc[0] if knob in knee and knee[knob].notna().any() else None
        if len(knee_on) and knee_value is not None:
            points.append(_ablation_point(knee_on, knee_value, True, metrics))
        points.sort(key=lambda p: (*knob_order(p["value"]), not p["knee"]))
        differ = []
        if len(knee):
            ref = knee.iloc[0]
            for h in params:
                if h == knob or h not in a:
                    continue
                mine = {fmt_param(v) for v in a[h]}
                if mine != {fmt_param(ref[h])}:
                    differ.append(f"{h} ({', '.join(sorted(mine))} vs the knee's {fmt_param(ref[h])})")
        out.append(dict(zip(GROUP, key), arm=arm, knob=knob, points=points, metric_name=a["metric_name"].iloc[0],
                        higher_is_better=bool(a["higher_is_better"].iloc[0]), knee_found=len(knee) > 0,
                        knee_seeds=sorted(int(x) for x in knee.loc[knee["status"] == "ok", "seed"].unique()),
                        ablation_seeds=sorted(seeds), differ=differ))
    return out


def knob_order(v) -> tuple:
    """Sort key of a knob value: numbers by value, then anything else by its text."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def fmt_param(v) -> str:
    """A knob's value as text: numbers with %g, a missing value as —, anything else as str (tables.py uses it too)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:g}" if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else str(v)


# ---------------------------------------------------------------------------------------------- pretraining
PLATEAU_POINTS = 0.5     # accuracy: a gain below this many percentage points over the last 3 evaluations
PLATEAU_RELATIVE = 0.02  # other metrics (MSE): a gain below 2 % of the value 3 evaluations earlier
PLATEAU_SPAN = 3
PLATEAU_RULE = (
    f"A curve has reached a plateau when the mean curve over its seeds gained less than {PLATEAU_POINTS} "
    f"percentage points (accuracy) or {PLATEAU_RELATIVE:.0%} of the earlier value (MSE) over its last "
    f"{PLATEAU_SPAN} evaluations (final − the value {PLATEAU_SPAN} evaluations earlier, positive = better); "
    f"fewer than {PLATEAU_SPAN + 1} evaluations: not judged. One rule for the pretrained backbones' old-task curves "
    f"and the confirmed fine-tuning runs' new-task curves (pretrain_summary).")


def pretrain_summary(curves: pd.DataFrame, metric: str, higher_is_better: bool) -> dict | None:
    """One backbone's pretraining curves (columns seed, step, value; one curve per checkpoint seed): the final
    value per seed (mean_ci), the mean curve over seeds (mean, s.e. per evaluation), its best value, and the gain
    over its last PLATEAU_SPAN evaluations (final − the value PLATEAU_SPAN evaluations earlier, signed so positive
    = better; accuracy in percentage points, else in the metric's units with `gain_rel` relative to the earlier
    value). plateau: True when that gain is below the threshold, None with fewer than PLATEAU_SPAN + 1 points.
    None when no value is finite."""
    sign = 1.0 if higher_is_better else -1.0
    v = pd.to_numeric(curves["value"], errors="coerce")
    finite_rows = curves[np.isfinite(v.to_numpy(float))]
    if finite_rows.empty:
        return None
    table = finite_rows.pivot_table(index="step", columns="seed", values="value", aggfunc="first").sort_index()
    final = [float(c.dropna().iloc[-1]) for _, c in table.items() if c.notna().any()]
    per_step = [mean_ci(table.loc[s]) for s in table.index]
    mean = pd.Series([p.mean for p in per_step], index=table.index)
    se = pd.Series([p.se if p.n > 1 else math.nan for p in per_step], index=table.index)
    best_step = (mean * sign).idxmax()
    out = dict(n=table.shape[1], final=mean_ci(final), curve=mean, curve_se=se, best=float(mean[best_step]),
               best_step=int(best_step), gain=math.nan, gain_rel=math.nan, plateau=None)
    if len(mean) > PLATEAU_SPAN:
        now, before = float(mean.iloc[-1]), float(mean.iloc[-1 - PLATEAU_SPAN])
        gain = sign * (now - before)
        if metric == "accuracy":
            out.update(gain=100.0 * gain, plateau=bool(100.0 * gain < PLATEAU_POINTS))
        else:
            rel = gain / abs(before) if before != 0 else math.inf * np.sign(gain) if gain else 0.0
            out.update(gain=gain, gain_rel=rel, plateau=bool(rel < PLATEAU_RELATIVE))
    return out


def new_task_plateau(histories: pd.DataFrame, metric: str, higher_is_better: bool) -> dict | None:
    """Did one confirmed configuration's new-task validation curve reach a plateau? `histories`: columns seed,
    step, value (new_val per evaluation of its confirmation runs, step 0 = the pretrained model left out by the
    caller or not). The same rule as pretraining's (pretrain_summary: gain of the mean curve over its last
    PLATEAU_SPAN evaluations below PLATEAU_POINTS points / PLATEAU_RELATIVE)."""
    return pretrain_summary(histories, metric, higher_is_better)
