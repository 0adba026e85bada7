"""docs/results.md cannot drift from its data: the CPU suite's headline counts (the `<!-- suite_cpu counts: ... -->`
block, the sentence that states them, the per-workload table) are checked against the committed report
(docs/results/suite_cpu/report.md, its "Where PROFIT wins, loses or is not separated" table and per-experiment
counts) and against the paired differences recomputed from docs/results/suite_cpu/runs.csv with the project's own
analysis (analysis.stats: the same pairing, Holm's adjustment over the same family).

When the suite is re-run, regenerate the report and update the block, the sentence and the table together; this
test names the number that disagrees."""
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
SHORT = {"PROFIT better": "better", "PROFIT worse": "worse", "not separated": "tie", "≈": "tie",
         "— (n<2)": "untested"}


def kind(old: str, new: str) -> str:
    """One comparison's pattern over (old test, new test) verdicts, each 'better' / 'worse' / 'tie' / 'untested'."""
    if "untested" in (old, new):
        return "untested"
    v = sorted((old, new))
    if v == ["better", "worse"]:
        return "tradeoff"
    if v == ["tie", "tie"]:
        return "tie"
    return f"{'better' if 'better' in v else 'worse'}_{'both' if v[0] == v[1] else 'tie'}"


def tally(verdicts: list[tuple[str, str, str]]) -> dict[str, int]:
    """Counts of (experiment, old, new) Holm verdicts: every pattern, the comparisons, the untested ones."""
    c = Counter(kind(o, n) for _, o, n in verdicts)
    out = {k: c.get(k, 0) for k in KINDS}
    out["comparisons"] = len(verdicts)
    out["untested"] = c.get("untested", 0)
    return out


def per_workload(holm, raw) -> dict[str, tuple[int, ...]]:
    """workload → (comparisons, Holm better, not separated, worse, raw better, not separated, worse), counting old
    and new test verdicts separately, as the report's per-experiment lines do."""
    out = {}
    for (exp, ho, hn), (_, ro, rn) in zip(holm, raw):
        w = exp.removeprefix("suite_cpu_")
        c = list(out.get(w, (0,) * 7))
        c[0] += 1
        for i, v in enumerate(("better", "tie", "worse")):
            c[1 + i] += [ho, hn].count(v)
            c[4 + i] += [ro, rn].count(v)
        out[w] = tuple(c)
    return out


# ---------------------------------------------------------------------------------------------- results.md
def headline_block(text: str) -> dict[str, int]:
    m = re.search(r"<!-- suite_cpu counts[^:]*:(.*?)-->", text, re.S)
    assert m, "docs/results.md has no '<!-- suite_cpu counts: ... -->' block"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


PROSE = {  # the headline sentence's fixed phrasing: key → regex of its number
    "comparisons": r"Of the (\d+) paired PROFIT-vs-baseline comparisons",
    "tradeoff": r"(\d+) (?:is a trade-off|are trade-offs) \(better on one task, worse on the other\)",
    "tie": r"(\d+) (?:is|are) not separated on either task",
    "worse_tie": r"(\d+) (?:is|are) worse on one task and not separated on the other",
    "worse_both": r"(\d+) (?:is|are) worse on both",
    "better_tie": r"(\d+) (?:is|are) better on one task and not separated on the other",
    "better_both": r"(\d+) (?:is|are) better on both",
}


def headline_prose(text: str) -> dict[str, int]:
    flat = re.sub(r"\s+", " ", text.split("<!-- suite_cpu counts", 1)[-1].split("-->", 1)[-1])
    out = {}
    for key, pat in PROSE.items():
        m = re.search(pat, flat)
        assert m, f"docs/results.md: the headline sentence no longer says {pat!r}"
        out[key] = int(m.group(1))
    return out


def workload_table(text: str) -> dict[str, tuple[int, ...]]:
    m = re.search(r"\| workload \| comparisons \| Holm: PROFIT better [^\n]*\n\|[-|]+\|\n((?:\|.*\|\n)+)", text)
    assert m, "docs/results.md: the per-workload 'comparisons | Holm: PROFIT better | …' table is missing"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in m.group(1).strip().splitlines()]
    return {r[0]: tuple(int(x) for x in r[1:8]) for r in rows}


# ---------------------------------------------------------------------------------------------- report.md
def report_rows(text: str) -> tuple[list, list]:
    """(experiment, old, new) per row of the report's verdict table: Holm verdicts, then raw verdicts."""
    section = text.split("## Where PROFIT wins", 1)[1].split("\n## ", 1)[0]
    holm, raw = [], []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 11 and cells[0].startswith("suite_cpu_"):
            holm.append((cells[0], SHORT[cells[5]], SHORT[cells[8]]))
            raw.append((cells[0], SHORT[cells[6]], SHORT[cells[9]]))
    return holm, raw


def report_bullets(text: str) -> dict[str, tuple[int, ...]]:
    pat = (r"\*\*(suite_cpu_\w+)\*\*: Holm: wins (\d+), not separated (\d+), losses (\d+)[^;]*; raw \(unadjusted\): "
           r"wins (\d+), not separated (\d+), losses (\d+)[^;]*; of (\d+) comparisons")
    return {m[0].removeprefix("suite_cpu_"): (int(m[7]) // 2, *map(int, m[1:7])) for m in re.findall(pat, text)}


# ---------------------------------------------------------------------------------------------- runs.csv
@pytest.fixture(scope="module")
def recomputed() -> list[dict]:
    """The paired rows, recomputed from runs.csv by analysis.stats (Holm over the same family). The method names go
    through the registry's `canonical`, as analysis.load does for runs read from MLflow."""
    from analysis import stats
    from profit_bench.methods import canonical
    runs = pd.read_csv(SUITE / "runs.csv")
    canon = [canonical(m, p is True or str(p) == "True") for m, p in zip(runs["method"], runs["profit"])]
    runs["method"] = [m for m, _ in canon]
    cells = stats.confirmed_cells(runs, [], pd.read_csv(SUITE / "selection.csv"))
    return stats.paired_rows(runs, cells)


def recomputed_verdicts(paired: list[dict], adjusted: bool) -> list[tuple[str, str, str]]:
    from analysis import stats

    def one(p, m):
        v = stats.verdict(p[m], p["higher_is_better"], p[f"{m}_p_holm"] if adjusted else None)
        return "untested" if v is None else SHORT[v]
    return [(p["experiment"], one(p, "old_test"), one(p, "new_test")) for p in paired]


def problems(results_text: str, report_text: str, paired: list[dict] | None = None) -> list[str]:
    """Every disagreement between results.md's headline and the data (empty: consistent)."""
    out = []
    block, prose = headline_block(results_text), headline_prose(results_text)
    holm, raw = report_rows(report_text)
    data = tally(holm)
    for k, v in block.items():
        if k.startswith("seeds"):
            continue
        if data.get(k) != v:
            out.append(f"counts block {k}={v}, report table gives {data.get(k)}")
    for k, v in prose.items():
        if block.get(k) != v:
            out.append(f"headline sentence says {k}={v}, counts block {block.get(k)}")
    if per_workload(holm, raw) != report_bullets(report_text):
        out.append(f"report table {per_workload(holm, raw)} vs its own counts {report_bullets(report_text)}")
    if workload_table(results_text) != per_workload(holm, raw):
        out.append(f"results.md per-workload table {workload_table(results_text)} vs report "
                   f"{per_workload(holm, raw)}")
    if paired is not None:
        if recomputed_verdicts(paired, True) != holm:
            out.append("the report's Holm verdicts differ from those recomputed from runs.csv")
        if recomputed_verdicts(paired, False) != raw:
            out.append("the report's raw verdicts differ from those recomputed from runs.csv")
        ns = Counter(p["old_test"].n if p["old_test"].n == p["new_test"].n else -1 for p in paired)
        stated = {int(k[5:]): v for k, v in block.items() if k.startswith("seeds")}
        if dict(ns) != stated:
            out.append(f"seeds per comparison from runs.csv {dict(ns)} vs block {stated}")
    return out


def test_results_doc_matches_report_and_runs(recomputed):
    assert problems(RESULTS.read_text(), (SUITE / "report.md").read_text(), recomputed) == []


def test_report_verdicts_are_its_paired_intervals(recomputed):
    """Independent of results.md: the report table's rows are exactly the recomputed comparisons, in order."""
    holm, _ = report_rows((SUITE / "report.md").read_text())
    assert len(holm) == len(recomputed) > 0
    assert [p["experiment"] for p in recomputed] == [e for e, _, _ in holm]


def _mutations():
    """Edits of one stated number each (found in today's text, so the cases follow the document)."""
    text = RESULTS.read_text()
    block = re.search(r"<!-- suite_cpu counts[^:]*:(.*?)-->", text, re.S).group(0)
    k, v = re.search(r"(tradeoff)=(\d+)", block).groups()
    yield "block", block, block.replace(f"{k}={v}", f"{k}={int(v) + 1}")
    m = re.search(PROSE["worse_tie"], re.sub(r"\s+", " ", text))
    yield "prose", m.group(0), m.group(0).replace(m.group(1), str(int(m.group(1)) + 1), 1)
    row = re.search(r"\| digits \| (\d+) \| (\d+) \|", text)
    yield "table", row.group(0), f"| digits | {row.group(1)} | {int(row.group(2)) + 1} |"
    seeds = re.search(r"seeds(\d+)=(\d+)", block)
    yield "seeds", seeds.group(0), f"seeds{seeds.group(1)}={int(seeds.group(2)) + 1}"


@pytest.mark.parametrize("what", ["block", "prose", "table", "seeds"])
def test_an_edited_count_is_caught(what, recomputed):
    text = RESULTS.read_text()
    old, new = next((o, n) for w, o, n in _mutations() if w == what)
    flat = re.sub(r"\s+", " ", text)  # the sentence may wrap: its number is edited in the flattened text
    edited = text.replace(old, new, 1) if old in text else flat.replace(old, new, 1)
    assert edited not in (text, flat)  # the edit applied
    assert problems(edited, (SUITE / "report.md").read_text(), recomputed) != []


def test_kind_counts_patterns():
    """The classification, on hand-made verdicts: one of each pattern."""
    v = [("e", "better", "worse"), ("e", "worse", "better"), ("e", "tie", "tie"), ("e", "tie", "worse"),
         ("e", "worse", "tie"), ("e", "worse", "worse"), ("e", "better", "tie"), ("e", "untested", "tie")]
    assert tally(v) == {"tradeoff": 2, "tie": 1, "worse_tie": 2, "worse_both": 1, "better_tie": 1,
                        "better_both": 0, "comparisons": 8, "untested": 1}
    assert per_workload(v, v) == {"e": (8, 3, 6, 6, 3, 6, 6)}
