"""MLflow runs → report.md + PNG figures: selection on validation, confirmed results on test with statistics,
paired PROFIT − baseline differences (and a wins / ties / losses summary of them), fronts and hypervolumes, the
ablations around a PROFIT arm's confirmed knee (stage=ablation), the pretrained backbones' validation curves (sweep
parent metrics), the paper's tables side by side; with several experiments (a suite) a table of what each ran.

    python -m analysis.report [--experiment NAME ... | --suite NAME] [--tracking-uri URI] [--out reports/NAME]
                              [--runs ID ...]

`--suite NAME` reports every experiment whose latest sweep parent run carries the tag `suite=NAME`.

Input: the MLflow layout of docs/architecture.md (analysis/load.py lists what is read). The sections are
in analysis/sections.py; this module assembles them and is the CLI. Nothing here trains or chooses
anything on test: every choice is profit_bench.protocol's, on validation metrics.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from analysis import figures, load, sections, stats, tables
from analysis.load import DEFAULT_TRACKING_URI, load_runs
from analysis.tables import load_paper, md_table
from profit_bench import UserError, protocol, safe_name

NO_CONFIRM = "none (no stage=confirm runs, so no test numbers; run the sweep without --no-confirm)"


# ---------------------------------------------------------------------------------------------- header
def header(runs: pd.DataFrame, tracking_uri: str, parents: pd.DataFrame | None = None, suite: str | None = None,
           without_runs=()) -> list[str]:
    exps = [f"{e} (paper table {t})" if t else e
            for e, t in runs.groupby("experiment")["table"].first().items()]
    counts = runs.groupby(["stage", "status"]).size()
    count_text = "; ".join(f"{stage}: " + ", ".join(f"{n} {s}" for s, n in g.droplevel(0).items())
                           for stage, g in counts.groupby(level=0))
    search = runs[runs["stage"] == "search"]
    budget = search.groupby(["experiment", "arm"]).size().rename("trials").reset_index()
    budget_text = "; ".join(f"{e}: " + ", ".join(f"{a} {n}" for a, n in zip(g["arm"], g["trials"]))
                            for e, g in budget.groupby("experiment"))
    conf = runs[runs["stage"] == "confirm"]
    seeds = "; ".join(f"{e}: " + (", ".join(map(str, sorted(conf.loc[conf["experiment"] == e, "seed"].astype(int)
                                                            .unique()))) or NO_CONFIRM)
                      for e in sorted(runs["experiment"].unique()))
    title = f"suite {suite}: {', '.join(exps)}" if suite else ", ".join(exps)
    lines = [f"# PROFIT report — {title}", ""]
    if suite or runs["experiment"].nunique() > 1:
        lines += experiments_table(runs, parents, suite, without_runs)
    lines += [f"{len(runs)} trial runs ({count_text}). Tracking URI: `{tracking_uri}`. Per-run data: `runs.csv`; "
              f"the report's selection: `selection.csv`.", "",
              f"**Selection rule.** {protocol.SELECTION_RULE} {protocol.TIE_BREAK_RULE}", "",
              f"**Divergence.** {protocol.TRIAL_DIVERGENCE_RULE} {protocol.DIVERGENCE_RULE} Diverged runs are counted here and kept out of every "
              f"front, selection and hypervolume reference point; failed/killed runs are counted only.", "",
              f"**Search saturation.** {protocol.SATURATION_RULE} Shown per arm in the selection section as the "
              f"hypervolume gain over the last third, as a share of the final.", "",
              f"**Budget per arm** (search trials): {budget_text or 'no search runs'}.", "",
              f"**Confirmation seeds**: {seeds}.", ""]
    bad = runs[runs["status"] != "ok"]
    if len(bad):
        rows = [[r["experiment"], r["stage"], r["arm"], r["status"], r.get("seed"),
                 str(r["diverged_reason"]) if isinstance(r["diverged_reason"], str) else "—"]
                for _, r in bad.iterrows()]
        lines += [f"Runs left out ({len(bad)}, every stage):", "",
                  md_table(["experiment", "stage", "arm", "status", "seed", "reason"], rows), ""]
    return lines


def duration(seconds) -> str:
    if not load.finite(seconds):
        return "—"
    s = int(round(float(seconds)))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _budget_text(spec: dict, g: pd.DataFrame) -> str:
    budget = spec.get("budget") if isinstance(spec.get("budget"), dict) else {}
    if not budget:  # the trials' own params
        budget = {k: g[k].dropna().iloc[0] for k in ("epochs", "steps") if k in g and g[k].notna().any()}
    text = ", ".join(f"{tables.fmt_param(v)} {k}" for k, v in budget.items()) or "—"
    own = {a: e for a, e in (spec.get("methods") or {}).items() if isinstance(e, dict) and "epochs" in e}
    if own:  # arms with their own epoch count (spec.py): the budget is their cap
        text += " (cap; own epochs: " + ", ".join(f"{a} {_epochs_text(e['epochs'])}" for a, e in own.items()) + ")"
    return text


def _epochs_text(v) -> str:
    """An arm's `epochs:` entry: a count, or a searched range `3–10`."""
    if isinstance(v, dict) and len(v) == 1 and isinstance(next(iter(v.values())), list):
        args = next(iter(v.values()))
        return f"{args[0]}–{args[-1]}" if len(args) == 2 else "/".join(map(str, args))
    return str(v)


def _trials_text(parent, spec: dict, g: pd.DataFrame) -> str:
    per_arm = load.parent_value(parent, "params.trials_per_arm")
    if per_arm is None and spec.get("search") == "optuna":
        per_arm = spec.get("num_samples")
    if per_arm is not None:
        return tables.fmt_param(pd.to_numeric(per_arm, errors="coerce"))
    n = g[g["stage"] == "search"].groupby("arm").size()
    return "—" if n.empty else str(n.iloc[0]) if n.nunique() == 1 else f"{n.min()}–{n.max()}"


def experiments_table(runs: pd.DataFrame, parents: pd.DataFrame | None, suite: str | None, without_runs) -> list[str]:
    """What each experiment of a multi-experiment report (a suite) ran, from its latest sweep parent: the tags
    git_commit, device_name, suite_command, the params data_sizes, sweep.yaml (budget, num_samples,
    confirm_seeds), trials_per_arm, the metric wall_time_s."""
    latest = load.latest_parents(parents) if parents is not None else load.latest_parents(pd.DataFrame(
        columns=["experiment"]))
    rows = []
    for exp in sorted(set(runs["experiment"]) | set(without_runs)):
        g = runs[runs["experiment"] == exp]
        parent = latest.loc[exp] if exp in latest.index else None
        spec = load.sweep_yaml(parent)
        sizes = load.data_sizes(parent)
        conf_seeds = spec.get("confirm_seeds")
        if conf_seeds is None:
            conf_seeds = g.loc[g["stage"] == "confirm", "seed"].nunique() if len(g) else "—"
        commit = load.parent_value(parent, "tags.git_commit")
        command = load.parent_value(parent, "tags.suite_command")
        rows.append([exp, ", ".join(sorted(g["task"].astype(str).unique())) or spec.get("task", "—"),
                     ", ".join(sorted(g["model"].astype(str).unique())) or "—",
                     ", ".join(f"{k} {v}" for k, v in sizes.items()) or "—", _budget_text(spec, g),
                     _trials_text(parent, spec, g), conf_seeds,
                     duration(load.parent_value(parent, "metrics.wall_time_s")),
                     str(commit)[:10] if commit else "—", load.parent_value(parent, "tags.device_name") or "—",
                     f"`{command}`" if command else "—"])
    intro = (f"Suite **{suite}**: every experiment whose latest sweep carries the tag suite={suite}." if suite else
             "Experiments in this report (their latest sweep).")
    note = [f"No trial runs yet in: {', '.join(sorted(without_runs))}.", ""] if without_runs else []
    return [intro, "", md_table(["experiment", "task", "model(s)", "data sizes", "budget", "search trials per arm",
                                 "confirmation seeds", "wall time", "git commit", "machine", "command"], rows),
            ""] + note


# ---------------------------------------------------------------------------------------------- assembly
def write_report(runs: pd.DataFrame, out: Path, *, tracking_uri=None, curve_runs=(),
                 paper: dict | None = None, suite: str | None = None, without_runs=(),
                 parents: pd.DataFrame | None = None) -> Path:
    """`parents`: the sweep parent runs to read (a suite passes each experiment's latest); default: every sweep
    parent of the runs' experiments."""
    out.mkdir(parents=True, exist_ok=True)
    paper = paper or load_paper()
    hyper = load.hyper_columns(runs)
    chosen = stats.selection(runs)
    cells = stats.confirmed_cells(runs, hyper, chosen, load.profit_metric_keys(runs))
    paired = stats.paired_rows(runs, cells)
    if parents is None:
        parents = load.sweep_parents(sorted(set(runs["experiment"]) | set(without_runs)), tracking_uri)
    palette = figures.method_palette(runs["arm"])
    figs: list[str] = []
    body = [sections.wins_section(paired),
            sections.pretrain_section(runs, load.pretrain_curves(parents, tracking_uri), out, figs),
            sections.selection_section(runs, chosen, hyper),
            sections.confirmed_section(runs, cells, chosen, hyper, paper, palette, out, figs, tracking_uri),
            sections.paired_section(runs, cells, paired, paper),
            sections.equal_updates_section(runs, cells, tracking_uri),
            sections.knee_ablation_section(runs, cells, paper, palette, out, figs),
            sections.grid_section(runs, hyper, paper),
            "\n".join(["## Figures", ""] + sections.ablation_section(runs, hyper, palette, out, figs)
                      + sections.curves_section(runs, cells, palette, tracking_uri, set(curve_runs), out, figs)),
            sections.tables_section(runs, cells, hyper, paper, palette, out, figs)]
    body = [b for b in body if b]
    (out / "report.md").write_text("\n".join(header(runs, tracking_uri, parents, suite, without_runs) + body))
    runs.to_csv(out / "runs.csv", index=False)
    chosen.to_csv(out / "selection.csv", index=False)
    return out / "report.md"


def default_out(names) -> Path:
    """reports/<names joined by +>, each name confined to one folder-name component."""
    joined = "+".join(re.sub(r"[/\\\0]", "_", str(n)) for n in sorted(names)).lstrip(".")
    return Path("reports") / (joined or "report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0],
                                epilog="The report (report.md and its figures) is also attached to each reported "
                                       "sweep's parent MLflow run, as artifacts under report/.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", nargs="+", default=None, help="MLflow experiment name(s); default: all")
    which.add_argument("--suite", default=None, help="every experiment whose latest sweep parent run carries the tag "
                       "suite=SUITE (instead of --experiment)")
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking URI (default: "
                   f"{DEFAULT_TRACKING_URI}, as profit_bench.sweep)")
    p.add_argument("--out", default=None, help="output folder (default: reports/<experiment names>, or "
                   "reports/<suite> with --suite)")
    p.add_argument("--runs", nargs="*", default=(), help="run ids whose per-evaluation curves to plot "
                   "(default: per method one confirmation run of its knee configuration)")
    p.add_argument("--no-attach", action="store_true", help="do not attach the report to the sweep parent runs")
    return p


def attach_report(runs: pd.DataFrame, out: Path, tracking_uri: str) -> int:
    """report.md and its figures as artifacts (report/) of every sweep parent run the report covers: the
    MLflow UI shows them beside the runs. Returns how many parents got them."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    md = out / "report.md"
    named = set(re.findall(r"\]\(([^)\s]+)\)", md.read_text())) | {"report.md", "runs.csv", "selection.csv"}
    files = [out / n for n in sorted(named) if "/" not in n and (out / n).is_file()]  # this report's, not stale
    parents = sorted({p for p in runs["parent_id"].dropna().astype(str) if p and p != "nan"})
    for pid in parents:
        for f in files:
            client.log_artifact(pid, str(f), "report")
    return len(parents)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in args.experiment or []:
            safe_name(name, "--experiment")
        if args.suite is not None:
            safe_name(args.suite, "--suite")
        if (args.tracking_uri or "").startswith(("http://", "https://")):
            from profit_bench.tracking import check_reachable
            check_reachable(args.tracking_uri)  # seconds, one line; MLflow's own client retries for minutes
        if args.suite:
            experiments = load.suite_experiments(args.suite, args.tracking_uri)
            runs = load_runs(experiments, args.tracking_uri, skip_empty=True)
            # Only the runs (and pretraining curves) of each experiment's latest sweep: a workload re-run
            # (`--workloads W`) replaces the earlier sweep of that experiment instead of pooling with it.
            parents = load.latest_parents(load.sweep_parents(experiments, args.tracking_uri)).reset_index()
            runs = runs[runs["parent_id"].isin(parents["run_id"])]
            without = sorted(set(experiments) - set(runs["experiment"]))
            out = Path(args.out or default_out([args.suite]))
        else:
            runs, without, parents = load_runs(args.experiment, args.tracking_uri), [], None
            out = Path(args.out or default_out(runs["experiment"].unique()))
        path = write_report(runs, out, tracking_uri=args.tracking_uri, curve_runs=args.runs, suite=args.suite,
                            without_runs=without, parents=parents)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no report written (run the same command again)", file=sys.stderr)
        return 130
    print(f"wrote {path} ({len(runs)} runs)")
    if not args.no_attach:
        try:
            n = attach_report(runs, Path(path).parent, args.tracking_uri)
            print(f"attached to {n} sweep parent run(s) in MLflow (artifacts: report/)")
        except Exception as e:  # noqa: BLE001 - the report is written; a read-only artifact store is no error
            print(f"warning: the report could not be attached to the MLflow runs ({e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
