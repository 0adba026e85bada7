"""Issue 25's readings study of Table 1 (sweeps/table1_regime.yaml): tables, the distance ranking and a
Figure-3-style plot, written to docs/results/table1_regime/.

    python -m profit_bench.sweep table1_regime          # the two workloads: readings, then profit
    python -m analysis.table1_regime --figure today 1000 100 main weights  # → docs/results/table1_regime/

Distance of a reading to the paper: the mean over Table 1's six baseline MSEs (pretrained, full, head-only ×
old, new) of |ln(our mean / paper)|, our means over the seeds on VALIDATION (the readings are chosen there; the
test numbers are printed beside them). 0 = every number matches; ln 2 = 0.69 = each off by a factor 2.

The plot re-runs one fresh seed of the chosen reading (pretrained from the sweep's cache, then head-only, full and
PROFIT fine-tuning, each deterministic on the CPU) and draws the predictions over the combined domain.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.load import load_runs
from analysis.stats import fmt_ci, fmt_stat, mean_ci

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "table1_regime"
READING = ["activation", "layernorm", "batch_size", "pretrain_batch_size"]
METRICS = ["old_val", "new_val", "old_test", "new_test"]
TARGET_VAR = 0.4998  # variance of sin(10‖x‖) for x ~ U[0.8, 1.5]²: a constant predictor's new-task MSE


def paper_rows() -> dict[str, dict]:
    rows = yaml.safe_load((ROOT / "analysis" / "paper_tables.yaml").read_text())["table1"]["rows"]
    return {r["method"]: r for r in rows}


def reading_name(r) -> str:
    return f"{r['activation']} / LN {r['layernorm'].replace('_act', '')} / batch {int(r['batch_size'])}"


def fill_reading(runs: pd.DataFrame) -> pd.DataFrame:
    """The reading knobs of every run: as logged (a sweep logs its arms' knobs, its `trial:` block's model/data
    knobs and the knobs a logged toy_variant fills), else its toy_variant's value, else today's (runs logged
    before tracking.MODEL_DATA_KNOBS existed ran a `trial:` toy_variant of today only)."""
    from profit_bench.tasks import TOY_VARIANTS
    out = runs.copy()
    variant = out["toy_variant"] if "toy_variant" in out else pd.Series(None, index=out.index, dtype=object)
    for c in READING:
        implied = variant.map(lambda v, c=c: TOY_VARIANTS.get(v, TOY_VARIANTS["today"])[c]
                              if isinstance(v, str) else TOY_VARIANTS["today"][c])
        out[c] = out[c].fillna(implied) if c in out else implied
    return out


def per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per reading × seed × row (pretrained, full, head[, PROFIT cells]) with its four MSEs."""
    ok = fill_reading(runs[(runs["status"] == "ok") & ~runs["diverged"]])
    rows = []
    for _, r in ok.iterrows():
        key = {c: r[c] for c in READING} | {"seed": int(r["seed"])}
        # runs from before issue 27 have no profit_delta: their Δ was θ − θ_ref ("weights")
        delta = r.get("profit_delta") if isinstance(r.get("profit_delta"), str) else "weights"
        name = r["method"] if not r["is_profit"] else (f"PROFIT ratio {r['ratio']:g}, lr decay per "
                                                    f"{r['lr_schedule_unit']}, Δ {delta}")
        rows.append({**key, "row": name, **{m: r[m] for m in METRICS}})
        rows.append({**key, "row": "pretrained", **{m: r[f"{m}_before"] for m in METRICS}})
    df = pd.DataFrame(rows).drop_duplicates(subset=READING + ["seed", "row"])
    return df.sort_values(READING + ["row", "seed"]).reset_index(drop=True)


def merge_earlier(seeds: pd.DataFrame, paths: list[str]) -> pd.DataFrame:
    """`seeds` plus the rows of earlier runs' per-seed CSVs (same seeds, same code path: the trials are
    deterministic on the CPU) that this run does not have; a reading × seed × row this run has is this run's."""
    for path in paths:
        seeds = pd.concat([seeds, pd.read_csv(path)]).drop_duplicates(subset=READING + ["seed", "row"], keep="first")
    return seeds.sort_values(READING + ["row", "seed"]).reset_index(drop=True)


def summarise(seeds: pd.DataFrame) -> pd.DataFrame:
    """mean, s.e., 95 % CI and n of each MSE per reading × row."""
    out = []
    for key, g in seeds.groupby(READING + ["row"], sort=False):
        rec = dict(zip(READING + ["row"], key))
        for m in METRICS:
            s = mean_ci(g[m])
            rec.update({m: s.mean, f"{m}_se": s.se, f"{m}_lo": s.lo, f"{m}_hi": s.hi, f"{m}_n": s.n})
        out.append(rec)
    return pd.DataFrame(out)


def distances(summary: pd.DataFrame, split: str) -> pd.DataFrame:
    """Mean |ln(ours / paper)| over the six baseline MSEs per reading (NaN when a row is missing)."""
    paper = paper_rows()
    out = []
    for key, g in summary.groupby(READING, sort=False):
        terms = []
        for row in ("pretrained", "full", "head"):
            hit = g[g["row"] == row]
            for task in ("old", "new"):
                ours = hit[f"{task}_{split}"].iloc[0] if len(hit) else math.nan
                terms.append(abs(math.log(ours / paper[row][task])) if ours > 0 else math.nan)
        out.append({**dict(zip(READING, key)), f"distance_{split}": float(np.mean(terms))})
    return pd.DataFrame(out)


def distance_se(seeds: pd.DataFrame, split: str, draws: int = 300) -> pd.DataFrame:
    """Bootstrap s.e. of each reading's distance: its seeds resampled with replacement (the same seeds for its
    three rows: one draw = one set of pretrained models), `draws` times, fixed generator."""
    rng = np.random.default_rng(0)
    out = []
    for key, g in seeds.groupby(READING, sort=False):
        ids = np.array(sorted(g["seed"].unique()))
        vals = []
        for _ in range(draws):
            pick = rng.choice(ids, size=len(ids), replace=True)
            boot = pd.concat([g[g["seed"] == i] for i in pick])
            vals.append(distances(summarise(boot), split)[f"distance_{split}"].iloc[0])
        out.append({**dict(zip(READING, key)), f"distance_{split}_se": float(np.nanstd(vals, ddof=1))})
    return pd.DataFrame(out)


def _cell(summary_row, metric: str) -> str:
    s = mean_ci([])._replace(mean=summary_row[metric], se=summary_row[f"{metric}_se"], lo=summary_row[f"{metric}_lo"],
                             hi=summary_row[f"{metric}_hi"], n=int(summary_row[f"{metric}_n"]))
    # The study's tables in docs/results.md keep one cell per value (issue 25's section): interval and n inside it.
    return f"{fmt_stat(s, 'mse')} {fmt_ci(s, 'mse')} (n={s.n})" if s.n >= 2 else f"{fmt_stat(s, 'mse')} (n={s.n})"


def readings_markdown(summary: pd.DataFrame, ranked: pd.DataFrame, split: str) -> str:
    paper = paper_rows()
    lines = [f"| rank | reading | distance (val) ± bootstrap s.e. | distance (test) | row | old {split} MSE | "
             f"new {split} MSE |", "|---|---|---|---|---|---|---|"]
    for i, (_, r) in enumerate(ranked.iterrows(), 1):
        g = summary.set_index(READING).loc[tuple(r[c] for c in READING)]
        for row in ("pretrained", "full", "head"):
            s = g[g["row"] == row].iloc[0]
            first = row == "pretrained"
            lines.append(f"| {i if first else ''} | {reading_name(r) if first else ''} | "
                         f"{f'{r.distance_val:.3f} ± {r.distance_val_se:.3f}' if first else ''} | "
                         f"{f'{r.distance_test:.3f}' if first else ''} | "
                         f"{row} | {_cell(s, f'old_{split}')} | {_cell(s, f'new_{split}')} |")
    lines.append(f"| | **paper** | | | pretrained / full / head | {paper['pretrained']['old']} / "
                 f"{paper['full']['old']} / {paper['head']['old']} | {paper['pretrained']['new']} / "
                 f"{paper['full']['new']} / {paper['head']['new']} |")
    return "\n".join(lines) + "\n"


def profit_markdown(summary: pd.DataFrame) -> str:
    """Stage 2, one table per reading: the pretrained row, the baselines and every PROFIT cell beside the paper."""
    paper = paper_rows()
    ref = {"pretrained": "pretrained", "full": "full", "head": "head"}
    out = []
    for key, g in summary.groupby(READING, sort=False):
        lines = [f"**{reading_name(dict(zip(READING, key)))}**", "",
                 "| row | old test MSE | paper | new test MSE | paper |", "|---|---|---|---|---|"]
        order = ["pretrained", "full", "head"] + sorted(r for r in g["row"] if r.startswith("PROFIT"))
        for row in order:
            s = g[g["row"] == row].iloc[0]
            p = paper[ref.get(row, "profit")]
            lines.append(f"| {row} | {_cell(s, 'old_test')} | {p['old']} | {_cell(s, 'new_test')} | {p['new']} |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- compute
def pretrain_metas(runs: pd.DataFrame, cache_dir: Path) -> list[dict]:
    """The cache metadata (wall_time_s, cpu_time_s, ...) of every checkpoint the study's runs fine-tuned from."""
    import json

    from profit_bench.pretrain import cache_path, default_pretrain_config
    metas = []
    for (seed, act, ln, bs), _ in fill_reading(runs).groupby(["seed", "activation", "layernorm",
                                                               "pretrain_batch_size"]):
        pcfg = default_pretrain_config("toy", batch_size=int(bs), activation=act, layernorm=ln)
        path = cache_path("toy", "mlp", int(seed), pcfg, cache_dir).with_suffix(".json")
        metas.append(json.loads(path.read_text()) if path.is_file() else {"missing": str(path)})
    return metas


def compute_markdown(stages: dict[str, pd.DataFrame], cache_dir: Path) -> str:
    """Core-seconds of the study: every trial's process CPU time and every checkpoint's pretraining CPU time
    (what a loaded shared machine's wall clock hides), with their wall times beside them."""
    lines = ["| part | count | CPU core-s | wall s (as measured, under load) |", "|---|---|---|---|"]
    cpu_all = 0.0
    for name, runs in stages.items():
        metas = pretrain_metas(runs, cache_dir)
        got = [m for m in metas if "cpu_time_s" in m]
        pre_cpu, pre_wall = sum(m["cpu_time_s"] for m in got), sum(m["wall_time_s"] for m in got)
        note = f" ({len(metas) - len(got)} without a CPU time)" if len(got) < len(metas) else ""
        lines.append(f"| {name}: pretraining | {len(metas)}{note} | {pre_cpu:.0f} | {pre_wall:.0f} |")
        done = runs["cpu_time_s"].notna()
        lines.append(f"| {name}: fine-tuning trials | {done.sum()} | {runs['cpu_time_s'].sum():.0f} | "
                     f"{runs['wall_time_s'].sum():.0f} |")
        cpu_all += pre_cpu + runs["cpu_time_s"].sum()
    lines.append(f"| **total** | | **{cpu_all:.0f}** | |")
    return ("\n".join(lines) + f"\n\n{cpu_all:.0f} core-seconds ⇒ ≥ {cpu_all / 2 / 60:.0f} min on 2 free cores "
            f"(2 trials or pretrainings at a time, one thread each; Ray start-up, MLflow and stage barriers "
            f"come on top).\n")


def unit_costs(stages: dict[str, pd.DataFrame], cache_dir: Path) -> tuple[dict, dict]:
    """Measured mean CPU seconds per fine-tuning trial (method, PROFIT or not, batch size) and per pretraining
    (batch size), over every run of the study that recorded a CPU time."""
    trials, pre = {}, {}
    for runs in stages.values():
        runs = fill_reading(runs[runs["cpu_time_s"].notna()]) if "cpu_time_s" in runs else runs.iloc[:0]
        for key, g in runs.groupby(["method", "is_profit", "batch_size"]):  # PROFIT: any method through it
            trials.setdefault(("profit" if key[1] else key[0], bool(key[1]), int(key[2])), []).extend(g["cpu_time_s"])
        for m in pretrain_metas(runs, cache_dir):
            if "cpu_time_s" in m:
                pre.setdefault(int(m["config"]["batch_size"]), []).append(m["cpu_time_s"])
    return ({k: float(np.mean(v)) for k, v in trials.items()}, {k: float(np.mean(v)) for k, v in pre.items()})


def projection_markdown(stages: dict[str, pd.DataFrame], cache_dir: Path, suite: str = "table1_regime") -> str:
    """The whole one-command study (every workload of `suite`) in core-seconds: its trials and checkpoints
    counted from the YAML, each costed at the measured mean of its kind (unit_costs)."""
    from profit_bench.plan import Plan
    from profit_bench.pretrain import pretrain_config_for
    from profit_bench.spec import load_suite
    trial_cost, pre_cost = unit_costs(stages, cache_dir)
    lines = ["| workload | trials | checkpoints | projected CPU core-s (trials + pretraining) |", "|---|---|---|---|"]
    total, unmeasured = 0.0, set()
    for name, spec in load_suite(suite).workloads.items():
        cfgs = [p.config for p in Plan(spec).search_points()]
        keys = {(c.seed, pretrain_config_for(c)) for c in cfgs}
        t = p = 0.0
        for c in cfgs:
            k = (c.method if not c.profit else "profit", bool(c.profit), c.batch_size)
            t += trial_cost.get(k, math.nan)
            unmeasured |= {f"trial {k}"} if k not in trial_cost else set()
        for _, pc in keys:
            p += pre_cost.get(pc.batch_size, math.nan)
            unmeasured |= {f"pretraining batch {pc.batch_size}"} if pc.batch_size not in pre_cost else set()
        total += t + p
        lines.append(f"| {name} | {len(cfgs)} | {len(keys)} | {t + p:.0f} ({t:.0f} + {p:.0f}) |")
    lines.append(f"| **total** | | | **{total:.0f}** ⇒ ≥ {total / 2 / 60:.0f} min on 2 free cores |")
    if unmeasured:
        lines.append(f"\nNot measured (NaN above): {', '.join(sorted(unmeasured))}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- Figure 3
def figure3(variant: str, seed: int, ratio: float, unit: str, delta: str, cache_dir: Path, path: Path) -> str:
    """Ground truth and the predictions of the pretrained, head-only, full and PROFIT models of one seed, as heat
    maps over [-1, 1.5]² (outside both task domains greyed) and along the diagonal x₁ = x₂ against ‖x‖."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from profit_bench.trial import TrialConfig, run_trial
    torch.set_num_threads(1)  # as a sweep's trial: two threads on a busy 2-core machine wait on each other
    base = dict(task="toy", toy_variant=variant, seed=seed, steps=1500, eval_every=100, device="cpu",
                cache_dir=str(cache_dir), pretrain_if_missing=False)
    models, mses = {}, {}
    for name, kw in [("head-only", dict(method="head")), ("full", dict(method="full")),
                     ("PROFIT", dict(method="profit", ratio=ratio, n_ref=1, ref_optimizer="sgd",
                                     lr_schedule_unit=unit, profit_delta=delta))]:
        r, models[name] = run_trial(TrialConfig(**base, **kw), return_model=True, progress=False)
        mses[name] = (r["old_test"], r["new_test"])
        mses["pretrained"] = (r["old_test_before"], r["new_test_before"])
    from profit_bench.pretrain import load_or_pretrain, pretrain_config_for
    from profit_bench.tasks import get_task
    from profit_bench.trial import resolve
    cfg = resolve(TrialConfig(**base))
    task = get_task("toy", seed=seed)
    pretrained = load_or_pretrain(task, "mlp", seed, pretrain_config_for(cfg), cache_dir, build=False)
    models = {"pretrained": pretrained, **models}

    n = 201
    g = np.linspace(-1.0, 1.5, n, dtype=np.float32)
    xx, yy = np.meshgrid(g, g)
    pts = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], 1))
    inside = (((np.abs(xx) <= 1) & (np.abs(yy) <= 1)) | ((xx >= 0.8) & (yy >= 0.8))).ravel()
    truth = np.sin(10 * np.linalg.norm(pts.numpy(), axis=1))
    diag = torch.from_numpy(np.repeat(np.linspace(0, 1.5, 301, dtype=np.float32)[:, None], 2, 1))
    with torch.no_grad():
        preds = {k: m.eval()(pts).squeeze(1).numpy() for k, m in models.items()}
        dpreds = {k: m.eval()(diag).squeeze(1).numpy() for k, m in models.items()}

    fig, axes = plt.subplots(2, 5, figsize=(17, 8), gridspec_kw=dict(height_ratios=[1.15, 1], hspace=0.45))
    maps = {"ground truth": truth, **preds}
    for ax, (k, v) in zip(axes[0], maps.items()):
        shown = np.where(inside, v, np.nan).reshape(n, n)
        im = ax.imshow(shown, origin="lower", extent=(-1, 1.5, -1, 1.5), cmap="RdBu_r", vmin=-1.5, vmax=1.5)
        ax.plot([0.8, 1.5, 1.5, 0.8, 0.8], [0.8, 0.8, 1.5, 1.5, 0.8], "k--", lw=0.8)
        ax.plot([-1, 1, 1, -1, -1], [-1, -1, 1, 1, -1], "k:", lw=0.8)
        title = k if k == "ground truth" else f"{k}\ntest MSE old {mses[k][0]:.3f}\nnew {mses[k][1]:.3f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([-1, 0, 1.5])
        ax.set_yticks([-1, 0, 1.5])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="f(x)")
    r = np.linalg.norm(diag.numpy(), axis=1)
    for ax, k in zip(axes[1], maps):
        ax.plot(r, np.sin(10 * r), color="black", lw=1, label="ground truth")
        if k != "ground truth":
            ax.plot(r, dpreds[k], color="tab:red", lw=1.2, label=k)
        ax.axvspan(0.8 * math.sqrt(2), 1.5 * math.sqrt(2), color="tab:orange", alpha=0.12, lw=0)
        ax.axvspan(0, math.sqrt(2), color="tab:blue", alpha=0.08, lw=0)
        ax.set_ylim(-2, 2)
        ax.set_xlabel("‖x‖ along x₁ = x₂")
        ax.legend(fontsize=8, loc="lower left")
    axes[1][0].set_ylabel("f(x) (blue band: old domain,\norange: new)")
    fig.suptitle(f"Table 1 toy, reading '{variant}', seed {seed} (fresh), PROFIT ratio {ratio:g}, n_ref 1, "
                 f"O_ref SGD, lr decay per {unit}, Δ {delta}; dashed: new domain [0.8, 1.5]², dotted: old [-1, 1]²",
                 fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.table1_regime", description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--cache-dir", default="ray_results/pretrain_cache", help="the sweep's pretraining cache")
    p.add_argument("--earlier", nargs="*", default=[], metavar="CSV",
                   help="per-seed CSVs (readings_per_seed.csv format) of readings an earlier run measured; a "
                        "reading × seed × row this run has too is taken from this run")
    p.add_argument("--earlier-profit", nargs="*", default=[], metavar="CSV",
                   help="the same for stage 2 (profit_per_seed.csv format)")
    p.add_argument("--figure", nargs=5, metavar=("VARIANT", "SEED", "RATIO", "UNIT", "DELTA"),
                   help="also draw the Figure-3-style plot for this toy_variant / fresh seed / PROFIT ratio / "
                        "lr_schedule_unit / profit_delta")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 200)

    runs = load_runs(["table1_regime_readings"], args.tracking_uri)
    seeds = merge_earlier(per_seed(runs), args.earlier)
    seeds.to_csv(out / "readings_per_seed.csv", index=False, float_format="%.6g")
    summary = summarise(seeds)
    ranked = distances(summary, "val").merge(distances(summary, "test"), on=READING)
    ranked = ranked.merge(distance_se(seeds, "val"), on=READING)
    ranked = ranked.sort_values("distance_val").reset_index(drop=True)
    summary.merge(ranked, on=READING).to_csv(out / "readings.csv", index=False, float_format="%.6g")
    (out / "readings_val.md").write_text(readings_markdown(summary, ranked, "val"))
    (out / "readings_test.md").write_text(readings_markdown(summary, ranked, "test"))
    (out / "top5.md").write_text(readings_markdown(summary, ranked.head(5), "test"))
    print(ranked.to_string())
    n_div = int((runs["status"] != "ok").sum() + runs["diverged"].sum())
    print(f"readings: {len(runs)} trials, {n_div} not ok / diverged")

    try:
        prof = load_runs(["table1_regime_profit"], args.tracking_uri)
    except Exception as e:  # noqa: BLE001 — stage 2 not run yet: stage 1's tables stand alone
        print(f"profit stage: {e}", file=sys.stderr)
        prof = None
    if prof is not None:
        pseeds = merge_earlier(per_seed(prof), args.earlier_profit)
        pseeds.to_csv(out / "profit_per_seed.csv", index=False, float_format="%.6g")
        psum = summarise(pseeds)
        psum.to_csv(out / "profit.csv", index=False, float_format="%.6g")
        (out / "profit.md").write_text(profit_markdown(psum))
        print(profit_markdown(psum))
    stages = {"readings": runs} | ({"profit": prof} if prof is not None else {})
    (out / "compute.md").write_text(compute_markdown(stages, Path(args.cache_dir)) + "\n" +
                                    projection_markdown(stages, Path(args.cache_dir)))
    print((out / "compute.md").read_text())
    if args.figure:
        variant, seed, ratio, unit, delta = args.figure
        print(figure3(variant, int(seed), float(ratio), unit, delta, Path(args.cache_dir), out / "figure3.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
