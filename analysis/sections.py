"""The sections of the report (analysis/report.py assembles them, writes report.md and runs the CLI): each
function takes the loaded runs (and the statistics stats.py derived from them) and returns its markdown, drawing
its figures into the report folder. Nothing here chooses anything on test: every choice is profit_bench.protocol's,
on validation metrics.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from analysis import figures, load, stats, tables
from analysis.tables import md_table
from profit_bench import protocol

# Search-stage knobs whose validation plot ablation_section draws (one knob varied, the rest fixed); the
# ablation *stage* (stats.ABLATION_KNOBS) varies n_ref and ratio only.
FIGURE_KNOBS = ("ratio", "n_ref", "ref_optimizer")
MAX_LINES = 10  # runs per curves / diagnostics figure


def group_title(task: str, model: str) -> str:
    return f"{tables.task_title(task)} — {tables.model_name(model)}"


def _groups(df: pd.DataFrame):
    return df.groupby(stats.GROUP, sort=True)


def _fig(out: Path, name: str) -> Path:
    """A figure's path directly in `out`: experiment, task and model names from the store may hold '/'."""
    return out / re.sub(r"[/\\\0]", "_", name)


def wins_section(paired: list[dict]) -> str:
    """The paired section's verdicts at a glance, Holm-adjusted over the report's family (stats.adjust_family), the
    raw (unadjusted) verdict beside each, and counts per experiment."""
    if not paired:
        return ""
    lines = ["## Where PROFIT wins, loses or is not separated (paired, test, Holm-adjusted)", "",
             f"**Statistics.** {stats.MULTIPLICITY_RULE}", "",
             "Per comparison (PROFIT − baseline per confirmation seed, same role): the verdict after Holm, then the "
             "raw verdict (95 % t-interval alone) and the raw → Holm p-values. '— (n<2)' has no test.", ""]
    rows, counts = [], {}
    for p in paired:
        row = [p["experiment"], group_title(p["task"], p["model"]), p["profit"], p["baseline"], p["choice"]]
        c = counts.setdefault(p["experiment"], {"holm": {}, "raw": {}, "n": 0})
        for m in ("old_test", "new_test"):
            holm = stats.verdict(p[m], p["higher_is_better"], p.get(f"{m}_p_holm", math.nan))
            raw = stats.verdict(p[m], p["higher_is_better"])
            c["holm"][holm] = c["holm"].get(holm, 0) + 1
            c["raw"][raw] = c["raw"].get(raw, 0) + 1
            c["n"] += 1
            row += [holm or "— (n<2)", raw or "— (n<2)", f"{_p(p.get(f'{m}_p'))} → {_p(p.get(f'{m}_p_holm'))}"]
        rows.append(row)
    lines += [md_table(["experiment", "task", "PROFIT arm", "baseline", "choice", "old test (Holm)", "old test (raw)",
                        "old p raw → Holm", "new test (Holm)", "new test (raw)", "new p raw → Holm"], rows), ""]
    for exp, c in sorted(counts.items()):
        def count(d):
            extra = f", {d[None]} without a test" if d.get(None) else ""
            return (f"wins {d.get(stats.BETTER, 0)}, not separated {d.get(stats.TIE, 0)}, losses "
                    f"{d.get(stats.WORSE, 0)}{extra}")
        lines.append(f"- **{exp}**: Holm: {count(c['holm'])}; raw (unadjusted): {count(c['raw'])}; of {c['n']} "
                     f"comparisons (old and new test per baseline × choice).")
    return "\n".join(lines + [""])


def _p(v) -> str:
    if v is None or not load.finite(v):
        return "—"
    return "<0.001" if v < 1e-3 else f"{v:.3f}"


def paper_effect(paper: dict, p: dict, m: str) -> tuple[float, str] | None:
    """The paper's reported |PROFIT − baseline| for this comparison, in our units (accuracy as a fraction), and
    where it comes from: Table 2 (accuracy: the same backbone family and main optimizer; otherwise the median over
    Table 2's PROFIT − optimizer gaps) or Table 1 (MSE, toy: full / head fine-tuning). None when nothing fits."""
    side = "old" if m.startswith("old") else "new"
    if p["metric_name"] == "accuracy" and paper.get("table2"):
        rows = paper["table2"]["rows"]
        prof = {r["model"]: r for r in rows if r.get("optimizer") == "profit"}
        family = tables.PAPER_FAMILY.get(p["model"])
        if family in prof and p.get("baseline_method") == "full":
            r = tables.paper_lookup(paper["table2"], model=family, optimizer=p.get("baseline_optimizer"))
            if r and r.get("optimizer") != "profit":
                return abs(prof[family][side] - r[side]) / 100.0, f"Table 2 {family} vs {r['optimizer']}"
        gaps = [abs(prof[r["model"]][side] - r[side]) / 100.0 for r in rows
                if r.get("optimizer") != "profit" and r["model"] in prof]
        return (float(pd.Series(gaps).median()), "Table 2 median") if gaps else None
    if p["metric_name"] == "mse" and paper.get("table1") and p.get("baseline_method") in ("full", "head"):
        prof = tables.paper_lookup(paper["table1"], method="profit")
        r = tables.paper_lookup(paper["table1"], method=p["baseline_method"])
        if prof and r:
            return abs(prof[side] - r[side]), f"Table 1 vs {r['method']}"
    return None


def pretrain_section(runs: pd.DataFrame, curves: pd.DataFrame, out: Path, figs: list) -> str:
    """The pretrained checkpoints' old-task validation curves (sweep parent metrics pretrain.<model>.seed<S>.old_val):
    did pretraining reach a plateau before fine-tuning started?"""
    if curves.empty:
        return ""
    lines = ["## Pretrained backbones (old-task validation, before fine-tuning)", "",
             f"Per backbone, over its pretrained checkpoints (one per seed): the final old-task validation metric "
             f"(mean ± s.e.), the best value of the mean curve over seeds (at which evaluation), the mean curve's "
             f"last 4 evaluations, and its gain over the last {stats.PLATEAU_SPAN} evaluations (final − the value "
             f"{stats.PLATEAU_SPAN} evaluations earlier, positive = better; accuracy in percentage points). "
             f"**Plateau rule.** {stats.PLATEAU_RULE}", ""]
    body: list[str] = []
    for exp, ce in curves.groupby("experiment", sort=True):
        g = runs[runs["experiment"] == exp]
        if g.empty:  # no trial run says which metric (and direction) the curves hold
            continue
        rows, summaries = [], {}
        for model, cm in ce.groupby("model", sort=True):
            gm = g[g["model"] == model] if (g["model"] == model).any() else g
            metric, hib = gm["metric_name"].iloc[0], bool(gm["higher_is_better"].iloc[0])
            s = stats.pretrain_summary(cm, metric, hib)
            if s is None:
                rows.append([tables.model_name(model), "—", "no finite value", "—", "—", "—", "—"])
                continue
            summaries[model] = s
            last = " → ".join(stats.fmt_num(v, metric) for v in s["curve"].iloc[-4:])
            if math.isnan(s["gain"]):
                gain, plateau = f"— ({len(s['curve'])} evaluations)", "— (fewer than 4 evaluations)"
            elif metric == "accuracy":
                gain = f"{s['gain']:+.2f} points"
                plateau = "yes" if s["plateau"] else "no (still improving)"
            else:
                gain = f"{s['gain']:+.4g} ({100 * s['gain_rel']:+.1f} %)" if load.finite(s["gain_rel"]) else \
                    f"{s['gain']:+.4g}"
                plateau = "yes" if s["plateau"] else "no (still improving)"
            rows.append([tables.model_name(model), s["n"], stats.fmt_stat(s["final"], metric),
                         f"{stats.fmt_num(s['best'], metric)} (evaluation {s['best_step']})", last, gain, plateau])
        unit = "acc (%)" if metric == "accuracy" else metric
        title = f"pretraining, old-task validation — {exp}"
        body += [f"### {exp}: {tables.task_title(g['task'].iloc[0])}", "",
                 md_table(["backbone", "seeds", f"final old val {unit}", "best (mean curve)",
                           "mean curve, last 4 evaluations", f"gain over the last {stats.PLATEAU_SPAN} evaluations",
                           "plateau"], rows), ""]
        if summaries:
            name = figures.plot_pretrain(summaries, metric, hib, title, _fig(out, f"pretrain_{exp}.png"))
            figs.append(name)
            body += [f"![{title}]({name})", ""]
    return "\n".join(lines + body) if body else ""


# ---------------------------------------------------------------------------------------------- selection
def selection_section(runs, chosen, hyper) -> str:
    lines = ["## Selection (search stage, validation metrics only)", ""]
    for key, g in _groups(runs):
        metric = g["metric_name"].iloc[0]
        ch = stats.rows_of(chosen, stats.GROUP, key)
        ref = stats.val_reference(g)
        lines += [f"### {g['experiment'].iloc[0]}: {group_title(*key[1:])}", "",
                  f"Validation reference point: old = {stats.fmt_num(ref[0], metric)}, new = "
                  f"{stats.fmt_num(ref[1], metric)} (pretrained and worst non-diverged search trial"
                  f"{', and chance' if g['higher_is_better'].iloc[0] else ''}).", ""]
        search = g[g["stage"] == "search"]
        conf_keys = set(g.loc[g["stage"] == "confirm", "config_key"])
        sats = search_saturation(search, ref)
        rows = []
        for arm, a in search.groupby("arm", sort=True):
            ok = a[a["status"] == "ok"]
            mask = protocol.pareto_mask(ok[["old_val", "new_val"]].to_numpy(float),
                                        (bool(g["higher_is_better"].iloc[0]),) * 2)
            for _, c in ch[ch["arm"] == arm].iterrows():
                row = search[search["config_key"] == c["config_key"]].iloc[0]
                rows.append([arm, len(a), int((a["status"] == "diverged").sum()), int(mask.sum()), sats.get(arm, "—"),
                             c["choice"],
                             tables.config_text(row, hyper), stats.fmt_num(c["old_val"], metric),
                             stats.fmt_num(c["new_val"], metric),
                             "yes" if c["config_key"] in conf_keys else "no"])
        lines += [md_table(["arm", "search trials", "diverged", "validation Pareto set", "search saturated",
                            "choice", "config", f"old val {metric}", f"new val {metric}", "confirmed"], rows), ""]
        bad = sorted(a for a, v in sats.items() if v.startswith("**no"))
        if bad:
            lines += [f"**Unsaturated search** (its validation front still grew over its last third of trials; more "
                      f"trials could change its choice): {', '.join(bad)}.", ""]
    return "\n".join(lines)


def search_saturation(search: pd.DataFrame, ref) -> dict[str, str]:
    """arm → the saturation check's verdict (protocol.SATURATION_RULE) on its search runs in suggestion order
    (the `search_index` tag; sweeps older than it have none: not judged), non-ok runs counted as trials that add
    nothing."""
    if search.empty or "search_index" not in search or search["search_index"].isna().all():
        return {}
    hib = bool(search["higher_is_better"].iloc[0])
    order = pd.to_numeric(search["search_index"], errors="coerce")
    out = {}
    for arm, a in search.assign(_order=order).sort_values("_order", kind="stable").groupby("arm", sort=True):
        pts = a[["old_val", "new_val"]].to_numpy(dtype=float, copy=True)
        pts[(a["status"] != "ok").to_numpy()] = float("nan")
        sat = protocol.saturation(pts, ref, hib)
        if sat["saturated"] is None:
            out[arm] = "— (< 3 trials)"
        else:
            gain = f"+{100 * sat['gain_share']:.1f} %" if math.isfinite(sat["gain_share"]) else "from 0"
            out[arm] = f"yes ({gain})" if sat["saturated"] else f"**no** ({gain})"
    return out


# ---------------------------------------------------------------------------------------------- confirmed
def confirmed_section(runs, cells, chosen, hyper, paper, palette, out: Path, figs: list,
                      tracking_uri: str | None = None) -> str:
    lines = ["## Confirmed results (stage=confirm runs, test metrics)", "",
             "Each configuration chosen on validation, re-run on the confirmation seeds. Values: mean ± s.e. over "
             "the n seeds, the 95 % t-interval in the column after each (— for n=1). forgetting = old-task loss of "
             "quality (positive = "
             "worse); gain = new-task improvement over the pretrained model (positive = better). Hypervolume: the "
             "exact 2-D area each method's confirmed points dominate, against the reference point below, with a "
             "percentile bootstrap 95 % CI over confirmation seeds. Budget: batches of new-task data seen and "
             "main-optimizer updates per run (a PROFIT main update costs n_ref + 1 batches; AdamW warm-up batches "
             "are main updates), mean over seeds; with an arm's own epochs (searched or fixed under the sweep's "
             "cap) each configuration's own. new-task plateau: the plateau rule of the pretrained backbones "
             f"applied to the mean new_val curve of the confirmation runs ({stats.PLATEAU_RULE}) 'no' = the "
             "budget may have stopped it early, a longer run could change its numbers.", ""]
    for key, g in _groups(runs):
        c = stats.rows_of(cells, stats.GROUP, key)
        title = f"{key[0]}: {group_title(*key[1:])}"
        metric = g["metric_name"].iloc[0]
        lines += [f"### {title}", ""]
        ref = stats.test_reference(g) if len(c) else None
        if len(c) == 0:
            lines += ["No confirmation runs for this group.", ""]
        else:
            lines += _cells_table(c, hyper, metric, plateaus(runs if tracking_uri else None, c, tracking_uri))
            lines += _hv_table(g, c, ref, metric)
        table = g["table"].iloc[0]
        ch = stats.rows_of(chosen, stats.GROUP, key)
        refs = dict(val=stats.val_reference(g), test=ref)
        name = figures.plot_pareto(g[g["stage"] == "search"], ch, c, refs,
                                   tables.paper_points(paper, table, key[2]) if table else [], palette, title,
                                   _fig(out, f"pareto_{key[0]}_{key[1]}_{key[2]}.png"),
                                   confirm=g[g["stage"] == "confirm"].drop_duplicates("seed"))
        figs.append(name)
        lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


def plateaus(runs, cells, tracking_uri) -> dict:
    """cell (stats.CELL_KEYS) → "yes" / "no (still improving, +x)" / "—": the new-task validation curve rule
    (stats.new_task_plateau) on each confirmed cell's confirmation runs (MLflow metric histories)."""
    if runs is None or not len(cells):
        return {}
    out = {}
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    for _, c in cells.iterrows():
        # the cell's own runs: a config_key (arm, model, params) recurs across a suite's workloads
        mine = stats.rows_of(conf, stats.CELL_KEYS, c[stats.CELL_KEYS])
        if mine.empty:
            continue
        hist = load.metric_histories({str(int(s)): rid for s, rid in zip(mine["seed"], mine["run_id"])},
                                     tracking_uri, ["new_val"])
        hist = hist[hist["step"] > 0].rename(columns={"run": "seed"})
        s = stats.new_task_plateau(hist, c["metric_name"], bool(c["higher_is_better"])) if len(hist) else None
        if s is None or s["plateau"] is None:
            out[_cell(c)] = "— (fewer than 4 evaluations)"
        else:
            gain = f"{s['gain']:+.2f} points" if c["metric_name"] == "accuracy" else f"{100 * s['gain_rel']:+.1f} %"
            out[_cell(c)] = "yes" if s["plateau"] else f"**no** (still improving, {gain})"
    return out


def _cell(c) -> tuple:
    return tuple(str(c[k]) for k in stats.CELL_KEYS)


def _budget(r) -> str:
    b, m = r.get("batches"), r.get("main_steps")
    fmt = lambda v: f"{v:.0f}" if load.finite(v) else "—"  # noqa: E731
    return f"{fmt(b)} / {fmt(m)}"


def _cells_table(c, hyper, metric, plateau: dict | None = None) -> list[str]:
    diag = [k for k in c.columns if k.startswith("profit_") and not k.endswith("_stat") and c[k].notna().any()]
    plateau = plateau or {}
    rows = []
    for _, r in c.assign(_o=c["choice"].map(stats.choice_order)).sort_values(["arm", "_o"]).iterrows():
        rows.append([r["arm"], r["choice"], tables.config_text(r, hyper), r["n"], r["n_bad"]]
                    + [cell for m in ("old_test", "new_test", "forgetting_test", "gain_test")
                       for cell in stats.stat_ci(r[m + "_stat"], metric)]
                    + [_budget(r), plateau.get(_cell(r), "—")]
                    + [stats.fmt_num(r[k]) if r["is_profit"] else "—" for k in diag])
    return [md_table(["arm", "choice", "config", "n", "diverged/failed", f"old test {metric}", "old 95 % CI",
                      f"new test {metric}", "new 95 % CI", "forgetting", "forgetting 95 % CI", "gain", "gain 95 % CI",
                      "batches / main updates", "new-task plateau"] + diag, rows), ""]


def _hv_table(g, c, ref, metric) -> list[str]:
    hv = stats.hypervolume_ci(g, c, ref)
    rows = [[arm, f"{h:.4g}", "n=1" if n < 2 else f"[{lo:.4g}, {hi:.4g}] (n={n})"]
            for arm, (h, lo, hi, n) in sorted(hv.items(), key=lambda kv: -kv[1][0])]
    chance = ", and chance" if c["higher_is_better"].iloc[0] else ""
    return [f"Test reference point: old = {stats.fmt_num(ref[0], metric)}, new = {stats.fmt_num(ref[1], metric)} "
            f"(pretrained and worst non-diverged confirmation run{chance}; metric units squared, accuracy as a "
            f"fraction).", "",
            md_table(["arm", "hypervolume (test)", "bootstrap 95 % CI"], rows), ""]


def paired_section(runs, cells, paired: list[dict] | None = None, paper: dict | None = None) -> str:
    paper = paper or {}
    lines = ["## PROFIT vs each baseline, paired by confirmation seed", "",
             "Difference = PROFIT − baseline per seed (same pretrained backbone, same data order), between the "
             "configurations each method chose for the same role (knee vs knee, ...); mean ± s.e. over the n seeds "
             "and the 95 % t-interval in the column after it, the verdict after Holm's adjustment over the report's "
             "family, raw → Holm p, and the minimum "
             f"detectable difference (MDD: paired t, {stats.POWER:.0%} power, α = {stats.ALPHA:g} two-sided, at this "
             "n and this comparison's s.d.; accuracy in points). 'MDD > paper' marks a comparison that could not see "
             "the paper's reported effect (source in brackets) even if it were real; the MDD at 10 seeds (same s.d.) "
             "says whether `--confirm-seeds 10` would.", ""]
    rows, blind, blind10, with_paper = [], 0, 0, 0
    for p in stats.paired_rows(runs, cells) if paired is None else paired:
        metric, hib = p["metric_name"], p["higher_is_better"]
        row = [p["experiment"], group_title(p["task"], p["model"]), p["profit"], p["baseline"], p["choice"],
               stats.fmt_n(p["old_test"], p["new_test"])]
        for m in ("old_test", "new_test"):
            v = stats.verdict(p[m], hib, p.get(f"{m}_p_holm", math.nan))
            mdd, mdd10 = p.get(f"{m}_mdd", math.nan), p.get(f"{m}_mdd10", math.nan)
            eff = paper_effect(paper, p, m)
            mark = ""
            if eff is not None and load.finite(mdd):
                with_paper += 1
                if mdd > eff[0]:
                    blind += 1
                    blind10 += bool(load.finite(mdd10) and mdd10 > eff[0])
                    mark = (f" > paper {stats.fmt_num(eff[0], metric)} ({eff[1]}); at 10 seeds "
                            f"{stats.fmt_num(mdd10, metric)}")
            row += [*stats.stat_ci(p[m], metric), v or "— (n<2)",
                    f"{_p(p.get(f'{m}_p'))} → {_p(p.get(f'{m}_p_holm'))}", stats.fmt_num(mdd, metric) + mark]
        rows.append(row)
    if not rows:
        return "\n".join(lines + ["No PROFIT and baseline arms confirmed on shared seeds.", ""])
    note = ([f"MDD larger than the paper's reported effect in {blind} of {with_paper} comparisons that have one; "
             f"with 10 confirmation seeds (same spread) still in {blind10}.", ""] if with_paper else [])
    return "\n".join(lines + [md_table(["experiment", "task", "PROFIT arm", "baseline", "choice", "n", "Δ old test",
                                        "Δ old 95 % CI", "old (Holm)", "old p raw → Holm", "old MDD", "Δ new test",
                                        "Δ new 95 % CI", "new (Holm)", "new p raw → Holm", "new MDD"], rows), ""]
                      + note)


def equal_updates_section(runs, cells, tracking_uri) -> str:
    """The secondary view (stats.EQUAL_UPDATES_RULE): every paired comparison at equal main-optimizer updates, from
    the confirmation runs' per-evaluation validation curves (MLflow histories of main_steps, old_val, new_val)."""
    conf = runs[(runs["stage"] == "confirm") & (runs["status"] == "ok")]
    if tracking_uri is None or conf.empty or not len(cells):
        return ""
    hist = load.metric_histories(dict(zip(conf["run_id"], conf["run_id"])), tracking_uri,
                                 ["main_steps", "old_val", "new_val"])
    lines = ["## Secondary view: PROFIT vs each baseline at equal main-optimizer updates (validation)", "",
             f"{stats.EQUAL_UPDATES_RULE} The equal-data comparison above is the headline.", ""]
    if hist.empty or not (hist["key"] == "main_steps").any():
        return "\n".join(lines + ["Not available: these runs did not log main_steps per evaluation (runs older "
                                  "than that metric).", ""])
    rows, same = [], 0
    for p in stats.equal_update_rows(runs, cells, hist):
        if p["equal_ends"]:  # both runs ended at the same count: the headline already compares at equal updates
            same += 1
            continue
        metric, hib = p["metric_name"], p["higher_is_better"]
        row = [p["experiment"], group_title(p["task"], p["model"]), p["profit"], p["baseline"], p["choice"],
               f"{p['updates'].mean:.0f}", f"{p['read_profit']:.0f} / {p['read_baseline']:.0f}"]
        for m in ("old_val", "new_val"):
            row += [stats.fmt_stat(p[m], metric), stats.verdict(p[m], hib, p.get(f"{m}_p_holm", math.nan)) or
                    "— (n<2)", f"{_p(p.get(f'{m}_p'))} → {_p(p.get(f'{m}_p_holm'))}"]
        rows.append(row)
    note = ([f"{same} comparison(s) left out: both runs made the same number of main updates (a budget in main "
             f"steps), so the headline already compares them at equal updates.", ""] if same else [])
    if not rows:
        return "\n".join(lines + note + ["No comparison differs in main updates.", ""])
    return "\n".join(lines + [md_table(["experiment", "task", "PROFIT arm", "baseline", "choice", "main updates",
                                        "read at (PROFIT / baseline)", "Δ old val", "old (Holm)",
                                        "old p raw → Holm", "Δ new val", "new (Holm)", "new p raw → Holm"], rows),
                              ""] + note)


def grid_section(runs, hyper, paper) -> str:
    """Every searched configuration run on ≥ 2 search seeds (a grid with seeds): validation mean ± s.e. and PROFIT's
    diagnostics per cell. Validation only: which reading of a knob helps, not a test result."""
    search = runs[(runs["stage"] == "search") & (runs["status"] == "ok")]
    diag = load.profit_metric_keys(runs)
    lines = []
    for key, g in _groups(search):
        if g.groupby("config_key").size().max() < 2:
            continue
        metric = g["metric_name"].iloc[0]
        rows = []
        for (arm, ck), c in g.groupby(["arm", "config_key"], sort=True):
            vals = [stats.mean_ci(c[m]) for m in ("old_val", "new_val")]
            rows.append([arm, tables.config_text(c.iloc[0], hyper), stats.fmt_n(*vals)]
                        + [stats.fmt_stat(v, metric) for v in vals]
                        + [stats.fmt_num(c[d].mean()) if c["is_profit"].iloc[0] else "—" for d in diag])
        table = g["table"].iloc[0]
        prow = tables.paper_lookup(paper.get(f"table{table}", {"rows": []}), method="profit") if table else None
        note = f" Paper's PROFIT row (table {table}): old {prow['old']}, new {prow['new']}." if prow else ""
        lines += [f"### {key[0]}: {group_title(*key[1:])}", "",
                  f"Search stage, validation, mean ± s.e. over the n search seeds of each configuration.{note}", "",
                  md_table(["arm", "config", "n", f"old val {metric}", f"new val {metric}"] + diag, rows), ""]
    if not lines:
        return ""
    return "\n".join(["## Search grid (validation, every configuration with ≥ 2 seeds)", ""] + lines)


def knee_ablation_section(runs, cells, paper, palette, out: Path, figs: list) -> str:
    """stage=ablation runs: one knob (n_ref, ratio) of a PROFIT arm's confirmed knee varied at a time on the
    confirmation seeds; the knee's own confirm runs are the centre row. Beside ours, the paper's Table 8 / 9 row
    of the same backbone family (CIFAR)."""
    abl = stats.ablation_cells(runs, cells, load.param_columns(runs))
    if not abl:
        return ""
    lines = ["## Ablations around the confirmed PROFIT configuration (test, confirmation seeds)", "",
             "One knob of a PROFIT arm's confirmed knee configuration varied at a time, every other setting as the "
             "knee's, run on the confirmation seeds (stage=ablation); the knee's row is its own confirmation runs on "
             "the same seeds. Test metrics, mean ± s.e. over the n seeds, the 95 % t-interval after each (— for "
             "n=1). The "
             "paper's columns are its Table 8 (n_ref) / Table 9 (ratio) row for the same backbone family, measured "
             "on CIFAR-10 → CIFAR-100: compare the trend over the knob, not the values.", ""]
    diag = stats.DIAG_FRAC if stats.DIAG_FRAC in runs and runs[stats.DIAG_FRAC].notna().any() else None
    by_plot: dict = {}
    for ab in abl:
        key = (ab["experiment"], ab["task"], ab["model"], ab["knob"])
        by_plot.setdefault(key, []).append(ab)
    for (exp, task, model, knob), group in by_plot.items():
        metric = group[0]["metric_name"]
        unit = "acc (%)" if metric == "accuracy" else metric
        num = tables.ABLATION_TABLES[knob] if knob in tables.ABLATION_TABLES else None
        family = tables.PAPER_FAMILY.get(model)
        has_paper = bool(num and paper.get(f"table{num}") and family)
        head = ["arm", knob, "n seeds", "diverged/failed", f"old test {unit}", "old 95 % CI", f"new test {unit}",
                "new 95 % CI"]
        head += [f"{diag} (mean ± s.e.)"] if diag else []
        if has_paper:
            head += [f"paper Table {num} {tables.model_name(family)} old (CIFAR-10, %)",
                     f"paper Table {num} {tables.model_name(family)} new (CIFAR-100, %)"]
        rows, notes = [], []
        for ab in group:
            for p in ab["points"]:
                row = [ab["arm"], tables.fmt_param(p["value"]) + (" (confirmed knee)" if p["knee"] else ""), p["n"],
                       p["n_bad"], *stats.stat_ci(p["old_test"], metric), *stats.stat_ci(p["new_test"], metric)]
                row += [stats.fmt_stat(p[diag], "mse")] if diag else []
                if has_paper:
                    pr = tables.paper_ablation_row(paper, knob, model, p["value"]) or {}
                    row += [tables.fmt_pct(pr.get("old")), tables.fmt_pct(pr.get("new"))]
                rows.append(row)
            if not ab["knee_found"]:
                notes.append(f"{ab['arm']}: no confirmation runs of its knee configuration, so no centre row.")
            elif set(ab["knee_seeds"]) - set(ab["ablation_seeds"]):
                notes.append(f"{ab['arm']}: the knee row uses its confirmation runs on the ablation's seeds "
                             f"({', '.join(map(str, ab['ablation_seeds']))}) of its "
                             f"{len(ab['knee_seeds'])} confirmation seeds.")
            if ab["differ"]:
                notes.append(f"{ab['arm']}: WARNING, the ablation runs differ from the knee in more than {knob}: "
                             f"{'; '.join(ab['differ'])}.")
        if num and paper.get(f"table{num}"):
            notes.append(f"Paper: {paper[f'table{num}']['title']} — " + (
                f"{tables.model_name(family)} row, the family of our {tables.model_name(model)}; CIFAR numbers."
                if family else f"no backbone of the {tables.model_name(model)}'s family (the paper ablates "
                               f"ResNet-18, ViT-Tiny, ViT-Small), so no paper column."))
        title = f"ablation over {knob} around the confirmed knee — {exp}: {group_title(task, model)}"
        name = figures.plot_ablation_test(group, palette, title,
                                          _fig(out, f"knee_ablation_{knob}_{exp}_{task}_{model}.png"))
        figs.append(name)
        lines += [f"### {exp}: {group_title(task, model)} — {knob}", "", md_table(head, rows), ""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
        lines += [f"![{title}]({name})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figures
def ablation_points(arm_runs: pd.DataFrame, knob: str, hyper: list[str]):
    """Search runs of one arm where `knob` takes ≥ 2 values while every other hyperparameter is fixed (the
    largest such set), or (None, why not)."""
    others = [h for h in hyper if h != knob and arm_runs[h].astype(str).nunique() > 1]
    if not others:
        return arm_runs, None
    best = None
    for _, g in arm_runs.groupby([arm_runs[h].astype(str) for h in others]):
        if g[knob].nunique() > 1 and (best is None or len(g) > len(best)):
            best = g
    if best is None:
        return None, (f"{knob} varies only together with {', '.join(others)} (no two runs share their other "
                      f"values); a grid over {knob} with the rest fixed would ablate it")
    return best, None


def ablation_section(runs, hyper, palette, out: Path, figs: list) -> list[str]:
    lines = ["### Ablations (search stage, validation)", ""]
    search = runs[(runs["stage"] == "search") & (runs["status"] == "ok") & runs["is_profit"]]
    for knob in FIGURE_KNOBS:
        if knob not in search:
            continue
        for key, g in _groups(search):
            parts, why = [], []
            for arm, a in g.groupby("arm"):
                if a[knob].nunique() < 2:
                    continue
                pts, reason = ablation_points(a, knob, hyper)
                if pts is None:
                    why.append(f"{arm}: {reason}")
                else:
                    parts.append(pts)
            title = f"PROFIT ablation over {knob} — {key[0]}: {group_title(*key[1:])}"
            if parts:
                name = figures.plot_ablation(pd.concat(parts), knob, palette, title,
                                             _fig(out, f"ablation_{knob}_{key[0]}_{key[1]}_{key[2]}.png"))
                figs.append(name)
                lines += [f"![{title}]({name})", ""]
            lines += [f"No ablation plot over {knob} for {key[0]} ({why_}). " for why_ in why]
    return lines + [""]


def curve_runs(g: pd.DataFrame, cells: pd.DataFrame, wanted: set) -> dict[str, str]:
    """Runs whose per-evaluation curves to draw: `--runs` if given, else per arm one confirmation run of its
    knee configuration (the search run of the knee when nothing was confirmed)."""
    if wanted:
        return {f"{r['arm']} {r['run_id'][:6]}": r["run_id"] for _, r in g.iterrows() if r["run_id"] in wanted}
    chosen = {}
    for arm, a in g[g["status"] == "ok"].groupby("arm"):
        knee = cells[(cells["arm"] == arm) & cells["choice"].str.contains("knee")] if len(cells) else cells
        pool = a[(a["stage"] == "confirm") & a["config_key"].isin(knee["config_key"])] if len(knee) else a.iloc[:0]
        pool = pool if len(pool) else a[a["stage"] == "search"] if (a["stage"] == "search").any() else a
        chosen[f"{arm} {pool['run_id'].iloc[0][:6]}"] = pool["run_id"].iloc[0]
    return chosen


def hyper_of(g: pd.DataFrame) -> list[str]:
    return load.hyper_columns(g)


def config_words(r, hyper) -> str:
    """A configuration in words for a legend: arm, the confirmed choice, its knobs."""
    choice = r.get("choice")
    choice = "" if choice is None or (isinstance(choice, float) and math.isnan(choice)) else \
        f" ({str(choice).replace(',', ' = ').replace('_', '-')})"
    knobs = tables.config_text(r, hyper)
    return f"{r['arm']}{choice}: {knobs}" if knobs != "—" else f"{r['arm']}{choice}"


def curves_section(runs, cells, palette, tracking_uri, wanted: set, out: Path, figs: list) -> list[str]:
    lines = ["### Validation curves and PROFIT diagnostics per evaluation", ""]
    diag_keys = load.profit_metric_keys(runs)
    for key, g in _groups(runs):
        c = stats.rows_of(cells, stats.GROUP, key)
        arm_of = dict(zip(g["run_id"], g["arm"]))
        xlabel = "main step" if "steps" in g and g["steps"].notna().any() else "epoch"
        metric, hib = g["metric_name"].iloc[0], bool(g["higher_is_better"].iloc[0])
        chosen = dict(list(curve_runs(g, c, wanted).items())[:MAX_LINES])
        hist = load.metric_histories(chosen, tracking_uri, ["old_val", "new_val"]) if chosen else pd.DataFrame()
        title = f"validation per evaluation — {key[0]}: {group_title(*key[1:])}"
        if not hist.empty:
            name = figures.plot_curves(hist, {k: arm_of[v] for k, v in chosen.items()}, palette, metric, hib,
                                       title, _fig(out, f"curves_{key[0]}_{key[1]}_{key[2]}.png"), xlabel)
            figs.append(name)
            lines += [f"![{title}]({name})", ""]
        prof = g[g["is_profit"] & (g["status"] == "ok")]
        prof = prof[prof["stage"] == "confirm"] if (prof["stage"] == "confirm").any() else prof
        if diag_keys and len(prof):
            ids = {f"{r['arm']} {r['run_id'][:6]}": r["run_id"] for _, r in prof.head(MAX_LINES).iterrows()}
            words = {k: config_words(prof[prof["run_id"] == v].iloc[0], hyper_of(g)) for k, v in ids.items()}
            dh = load.metric_histories(ids, tracking_uri, diag_keys)
            if not dh.empty:
                title = f"PROFIT diagnostics per evaluation — {key[0]}: {group_title(*key[1:])}"
                name = figures.plot_diagnostics(dh, words, title,
                                                _fig(out, f"diagnostics_{key[0]}_{key[1]}_{key[2]}.png"), xlabel)
                figs.append(name)
                lines += [f"![{title}]({name})", ""]
    return lines


def tables_section(runs, cells, hyper, paper, palette, out: Path, figs: list) -> str:
    parts = [b(cells, paper, hyper, runs) for b in tables.CELL_TABLES] if len(cells) else []
    cost = tables.cost_rows(runs)
    t11 = tables.table11(cost, paper)
    if t11:
        parts.append(t11)
        for task, rows in cost.groupby("task"):
            title = f"time and memory (Table 11's rows) — {tables.task_title(task)}"
            name = figures.plot_cost(rows.reset_index(drop=True), palette, title, _fig(out, f"cost_{task}.png"))
            figs.append(name)
            parts.append(f"![{title}]({name})\n")
    parts = [p for p in parts if p]
    return ("## Paper tables (ours beside the paper's numbers)\n\n"
            "The paper's values are typed in `analysis/paper_tables.yaml`; the table a sweep feeds is its parent "
            "run's `table` tag. A header says when our data is a stand-in for the paper's dataset.\n\n"
            + ("\n".join(parts) if parts else "No confirmed run feeds a paper table.\n"))
