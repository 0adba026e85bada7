"""docs/results.md cannot drift from its data: the CPU suite's headline counts (the `<!-- suite_cpu counts: ... -->`
block, the sentence that states them, the per-workload table) are checked against the committed report
(docs/results/suite_cpu/report.md, its "Where PROFIT wins, ties or loses" table) and against the paired
differences recomputed from docs/results/suite_cpu/runs.csv with the project's own analysis (analysis.stats).

The committed report predates Holm's adjustment: its verdicts are the unadjusted 95 % t-intervals, which is what
`stats.verdict` gives without an adjusted p-value. When the suite is re-run (issue 29), regenerate the report and
update the block, the sentence and the table together; this test says which number disagrees."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
SUITE = ROOT / "docs" / "results" / "suite_cpu"
KINDS = ("tradeoff", "tie", "worse_tie", "worse_both", "better_tie", "better_both")
SHORT = {"PROFIT better": "better", "PROFIT worse": "worse", "≈": "tie", "not separated": "tie"}


def kind(old: str, new: str) -> str:
    """One comparison's pattern over (old test, new test) verdicts, each 'better' / 'worse' / 'tie'."""
    v = sorted((old, new))
    if v == ["better", "worse"]:
        return "tradeoff"
    if v == ["tie", "tie"]:
        return "tie"
    return f"{'better' if 'better' in v else 'worse'}_{'both' if v[0] == v[1] else 'tie'}"


def tally(verdicts: list[tuple[str, str, str]]) -> dict[str, int]:
    """Counts of a list of (experiment, old, new) verdicts: every kind, the total, tie-old-worse-new."""
    c = Counter(kind(o, n) for _, o, n in verdicts)
    out = {k: c.get(k, 0) for k in KINDS}
    out["comparisons"] = len(verdicts)
    out["tie_old_worse_new"] = sum(1 for _, o, n in verdicts if (o, n) == ("tie", "worse"))
    return out


def per_workload(verdicts: list[tuple[str, str, str]]) -> dict[str, tuple[int, int, int]]:
    """workload → (PROFIT better, tie, PROFIT worse) over old and new test, as the results.md table counts."""
    out = {}
    for exp, o, n in verdicts:
        w = exp.removeprefix("suite_cpu_")
        b, t, l = out.get(w, (0, 0, 0))
        out[w] = (b + [o, n].count("better"), t + [o, n].count("tie"), l + [o, n].count("worse"))
    return out


# ---------------------------------------------------------------------------------------------- results.md
def headline_block(text: str) -> dict[str, int]:
    m = re.search(r"<!-- suite_cpu counts[^:]*:(.*?)-->", text, re.S)
    assert m, "docs/results.md has no '<!-- suite_cpu counts: ... -->' block"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def headline_prose(text: str) -> dict[str, int]:
    """The counts as the sentence after the block states them, in its fixed phrasing."""
    flat = re.sub(r"\s+", " ", text)
    patterns = {
        ("comparisons", "n5", "n2"): r"Of the (\d+) paired PROFIT-vs-baseline comparisons \((\d+) on 5 seeds, "
                                     r"(\d+) on 2 seeds\)",
        ("tradeoff",): r"(\d+) are trade-offs \(better on one task, worse on the other\)",
        ("tie",): r"(\d+) ties on both",
        ("worse_tie",): r"(\d+) worse on one task and tied on the other",
        ("worse_both",): r"(\d+) worse on both",
        ("tie_old_worse_new", "comparisons_again"): r"\((\d+) of (\d+), a plurality\) is a tie on the old task and a "
                                                    r"loss on the new one",
    }
    out = {}
    for keys, pat in patterns.items():
        m = re.search(pat, flat)
        assert m, f"docs/results.md: the headline sentence no longer says {pat!r}"
        out.update({k: int(v) for k, v in zip(keys, m.groups())})
    none_better = "none has PROFIT better on one task without being worse on the other" in flat
    out["better_tie"] = out["better_both"] = 0 if none_better else -1  # -1: the sentence does not claim 0
    return out


def workload_table(text: str) -> dict[str, tuple[int, int, int]]:
    m = re.search(r"\| workload \| PROFIT better \| ≈ [^|]*\| PROFIT worse \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", text)
    assert m, "docs/results.md: the per-workload 'PROFIT better | ≈ | PROFIT worse' table is missing"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in m.group(1).strip().splitlines()]
    return {r[0]: tuple(int(x) for x in r[1:4]) for r in rows}


# ---------------------------------------------------------------------------------------------- report.md
def report_verdicts(text: str) -> list[tuple[str, str, str]]:
    """(experiment, old, new) of every row of the report's "Where PROFIT wins, ties or loses" table."""
    section = text.split("## Where PROFIT wins", 1)[1].split("\n## ", 1)[0]
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 7 and cells[0].startswith("suite_cpu_"):
            out.append((cells[0], SHORT[cells[5]], SHORT[cells[6]]))
    return out


def report_bullets(text: str) -> dict[str, tuple[int, int, int]]:
    return {e.removeprefix("suite_cpu_"): (int(w), int(t), int(l)) for e, w, t, l in
            re.findall(r"\*\*(suite_cpu_\w+)\*\*: wins (\d+), ties (\d+), losses (\d+)", text)}


# ---------------------------------------------------------------------------------------------- runs.csv
@pytest.fixture(scope="module")
def recomputed() -> list[dict]:
    """The paired rows, recomputed from runs.csv by analysis.stats (the confirm runs carry their choice tags;
    selection.csv is the fallback the report used). The method names go through the registry's `canonical`, as
    analysis.load does for runs read from MLflow."""
    from analysis import stats
    from profit_bench.methods import canonical
    runs = pd.read_csv(SUITE / "runs.csv")
    canon = [canonical(m, p is True) for m, p in zip(runs["method"], runs["profit"])]
    runs["method"] = [m for m, _ in canon]
    cells = stats.confirmed_cells(runs, [], pd.read_csv(SUITE / "selection.csv"))
    return stats.paired_rows(runs, cells)


def recomputed_verdicts(paired: list[dict]) -> list[tuple[str, str, str]]:
    from analysis import stats
    return [(p["experiment"], *(SHORT[stats.verdict(p[m], p["higher_is_better"])] for m in ("old_test", "new_test")))
            for p in paired]


def problems(results_text: str, report_text: str, paired: list[dict] | None = None) -> list[str]:
    """Every disagreement between results.md's headline and the data (empty: consistent)."""
    out = []
    block, prose = headline_block(results_text), headline_prose(results_text)
    verdicts = report_verdicts(report_text)
    data = tally(verdicts)
    for k, v in block.items():
        if k in ("n5", "n2"):
            continue
        if data.get(k) != v:
            out.append(f"counts block {k}={v}, report table gives {data.get(k)}")
    for k, v in prose.items():
        want = block.get("comparisons") if k == "comparisons_again" else block.get(k)
        if want != v:
            out.append(f"headline sentence says {k}={v}, counts block {want}")
    if per_workload(verdicts) != report_bullets(report_text):
        out.append(f"report table {per_workload(verdicts)} vs its own counts {report_bullets(report_text)}")
    if workload_table(results_text) != per_workload(verdicts):
        out.append(f"results.md per-workload table {workload_table(results_text)} vs report {per_workload(verdicts)}")
    if paired is not None:
        if recomputed_verdicts(paired) != verdicts:
            out.append("the report's verdicts differ from those recomputed from runs.csv")
        ns = Counter(p["old_test"].n if p["old_test"].n == p["new_test"].n else -1 for p in paired)
        if dict(ns) != {5: block.get("n5"), 2: block.get("n2")}:
            out.append(f"seeds per comparison from runs.csv {dict(ns)} vs block n5={block.get('n5')} "
                       f"n2={block.get('n2')}")
    return out


def test_results_doc_matches_report_and_runs(recomputed):
    assert problems(RESULTS.read_text(), (SUITE / "report.md").read_text(), recomputed) == []


def test_report_verdicts_are_its_paired_intervals(recomputed):
    """Independent of results.md: the report table's rows are exactly the recomputed comparisons, in order."""
    verdicts = report_verdicts((SUITE / "report.md").read_text())
    assert len(verdicts) == len(recomputed) > 0
    assert [(p["experiment"]) for p in recomputed] == [e for e, _, _ in verdicts]


@pytest.mark.parametrize("old, new", [
    ("20 worse on one task and tied on the other", "21 worse on one task and tied on the other"),  # the prose
    ("worse_tie=20", "worse_tie=21"),                                                              # the block
    ("tradeoff=16 tie=17", "tradeoff=17 tie=16"),                                                  # both moved
    ("| toy | 7 | 4 | 9 |", "| toy | 7 | 5 | 8 |"),                                                # the table
    ("(52 on 5 seeds, 2 on 2 seeds)", "(54 on 5 seeds, 0 on 2 seeds)"),                            # n stated
])
def test_an_edited_count_is_caught(old, new, recomputed):
    text = RESULTS.read_text()
    assert text.count(old) == 1
    edited = text.replace(old, new)
    assert problems(edited, (SUITE / "report.md").read_text(), recomputed) != []


def test_kind_counts_patterns():
    """The classification, on hand-made verdicts: one of each pattern."""
    v = [("e", "better", "worse"), ("e", "worse", "better"), ("e", "tie", "tie"), ("e", "tie", "worse"),
         ("e", "worse", "tie"), ("e", "worse", "worse"), ("e", "better", "tie")]
    assert tally(v) == {"tradeoff": 2, "tie": 1, "worse_tie": 2, "worse_both": 1, "better_tie": 1,
                        "better_both": 0, "comparisons": 7, "tie_old_worse_new": 1}
    assert per_workload(v) == {"e": (3, 5, 6)}  # better 3, tie 5, worse 6 of the 14 verdicts
