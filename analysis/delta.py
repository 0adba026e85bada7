"""The exact-Δ ablation (sweeps/delta_ratio.yaml): per workload and ratio, PROFIT with delta="exact" beside
delta="weights" on the same seeds — old/new test metrics, the paired differences exact − weights, and the share of
the intended displacement that the rounded weights lost (profit_delta_lost, mean over each run's evaluations).

    python -m analysis.delta --suite delta_ratio [--tracking-uri sqlite:///mlflow.db]   # markdown on stdout
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from analysis.load import DEFAULT_TRACKING_URI, SETTLED, finite, load_runs, suite_experiments
from analysis.stats import fmt_n, fmt_stat, mean_ci, paired_difference
from profit_bench import UserError


def delta_table(runs: pd.DataFrame) -> str:
    """One markdown table per experiment (workload); rows: ratio; cells mean ± s.e. (n) over seeds. Every run
    that finished with finite test metrics counts: nothing is selected here, so a run that learned nothing (new
    accuracy at chance, which the search-stage rule calls diverged) is an outcome, as in the suite's confirmation."""
    out = []
    settled = runs["status"].isin(SETTLED) & runs["old_test"].map(finite) & runs["new_test"].map(finite)
    for exp, g in runs[settled].groupby("experiment", sort=False):
        metric = g["metric_name"].iloc[0]
        lr = g["lr"].iloc[0]
        out += [f"**{exp}** ({g['task'].iloc[0]}, {metric}, Adam lr {lr:.3g}, n_ref {int(g['n_ref'].iloc[0])})", "",
                "| ratio | λ_ref | n seeds (exact/weights) | lost (exact run) | lost (weights run) | "
                "old test, exact | old test, weights | old: exact − weights | new test, exact | new test, weights | "
                "new: exact − weights |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for ratio, r in g.groupby("ratio"):
            by = {d: r[r["profit_delta"] == d].set_index("seed") for d in ("exact", "weights")}
            seeds = by["exact"].index.intersection(by["weights"].index)
            cells = [f"{ratio:g}", f"{lr / ratio:.2g}",
                     fmt_n(*(mean_ci(by[d]["old_test"]) for d in ("exact", "weights")))]
            cells += [fmt_stat(mean_ci(by[d].get("profit_delta_lost", pd.Series(dtype=float))), "lost")
                      for d in ("exact", "weights")]
            for m in ("old_test", "new_test"):
                cells += [fmt_stat(mean_ci(by[d][m]), metric) for d in ("exact", "weights")]
                cells.append(fmt_stat(paired_difference(by["exact"].loc[seeds, m], by["weights"].loc[seeds, m]),
                                      metric))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.delta", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="delta_ratio")
    ap.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    args = ap.parse_args(argv)
    try:
        runs = load_runs(suite_experiments(args.suite, args.tracking_uri), args.tracking_uri, skip_empty=True)
        print(delta_table(runs))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
