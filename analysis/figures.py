"""The report's figures (matplotlib/seaborn, PNG files only). Every figure colours a method (arm) with the same
colour: `method_palette` is built once per report from every arm and handed to each plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from profit_bench.protocol import pareto_mask, to_maximize  # noqa: E402

DPI = 100
# inches; PNG pixels = inches × DPI (no tight bbox)
FIGSIZE = {"pareto": (12.8, 4.8), "wide": (12.8, 4.8), "small": (6.4, 4.0)}
PAPER_COLOUR = "dimgray"


def method_palette(labels) -> dict[str, tuple]:
    """A fixed colour per method label (sorted, so the same set of labels always gets the same colours)."""
    labels = sorted(set(labels))
    colours = sns.color_palette("tab10" if len(labels) <= 10 else "tab20", len(labels))
    return dict(zip(labels, colours))


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the PNG keeps exactly FIGSIZE × DPI pixels
    plt.close(fig)
    return path.name


def axis_label(name: str, metric: str, hib: bool, split: str) -> str:
    return f"{name} {metric}, {split} ({'↑' if hib else '↓'} better)"


def staircase(points, higher_is_better) -> np.ndarray:
    """Vertices of the attainment boundary of a front (raw units): drawn as a step line it encloses exactly the
    area protocol.hypervolume measures."""
    m = to_maximize(points, higher_is_better)
    m = m[np.argsort(m[:, 0])]  # front: x ascending means y descending
    verts = []
    for i, (x, y) in enumerate(m):
        verts.append((x, y))
        if i + 1 < len(m):
            verts.append((x, m[i + 1, 1]))
    return to_maximize(np.array(verts), higher_is_better)


def _front(ax, pts_new_old: np.ndarray, hib: bool, colour) -> None:
    front = pts_new_old[pareto_mask(pts_new_old, (hib, hib))]
    if len(front):
        v = staircase(front, (hib, hib))
        ax.plot(v[:, 0], v[:, 1], color=colour, lw=1.2)


def plot_pareto(search: pd.DataFrame, chosen: pd.DataFrame, cells: pd.DataFrame, refs: dict, paper: list,
                palette: dict, title: str, path: Path, confirm: pd.DataFrame | None = None) -> str:
    """Left: search trials on validation (chosen configurations ringed). Right: confirmed cells on test, mean ±
    s.e. over confirmation seeds, each method's front, the pretrained model, the paper's points where given."""
    metric, hib = str(search["metric_name"].iloc[0]), bool(search["higher_is_better"].iloc[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE["pareto"])
    ok = search[search["status"] == "ok"]
    for arm, g in ok.groupby("arm"):
        left.scatter(g["new_val"], g["old_val"], s=18, alpha=0.5, color=palette[arm], label=arm)
        _front(left, g[["new_val", "old_val"]].to_numpy(float), hib, palette[arm])
    if len(chosen):
        left.scatter(chosen["new_val"], chosen["old_val"], s=90, facecolors="none", edgecolors="black",
                     label="chosen (validation)")
    _fit_to_methods(left, ok["new_val"], ok["old_val"])
    _pretrained(left, search, "val")
    _reference(left, refs.get("val"))
    left.set_title("search trials, validation (diverged left out)", fontsize=9)
    for arm, c in cells.groupby("arm") if len(cells) else ():
        xerr = [s.se if s.n > 1 else 0 for s in c["new_test_stat"]]
        yerr = [s.se if s.n > 1 else 0 for s in c["old_test_stat"]]
        right.errorbar(c["new_test"], c["old_test"], xerr=xerr, yerr=yerr, fmt="o", color=palette[arm], label=arm,
                       markeredgecolor="black", capsize=2)
        _front(right, c[["new_test", "old_test"]].to_numpy(float), hib, palette[arm])
    methods = [p for p in paper if "pretrained" not in p[0]]  # the paper's pretrained model may sit far away too
    if len(cells):
        _fit_to_methods(right, pd.concat([cells["new_test"], pd.Series([p[2] for p in methods], dtype=float)]),
                        pd.concat([cells["old_test"], pd.Series([p[1] for p in methods], dtype=float)]))
    for name, old, new in paper:
        short = name.split(": ", 1)[-1]
        if not _on_axes(right, new, old):
            _off_axes(right, new, old, marker="X", colour=PAPER_COLOUR, label=f"{short} (paper), off the axes")
            continue
        right.scatter([new], [old], marker="X", s=60, color=PAPER_COLOUR, zorder=4)
        right.annotate(short, (new, old), fontsize=6, color=PAPER_COLOUR, xytext=(3, 3), textcoords="offset points")
    if paper:
        right.scatter([], [], marker="X", color=PAPER_COLOUR, label=paper[0][0].split(":")[0])
    # the pretrained models of the confirmation seeds (the test panel's points), not of the search seed
    _pretrained(right, confirm if confirm is not None and len(confirm) else search, "test")
    _reference(right, refs.get("test"))
    right.set_title("confirmed configurations, test (mean ± s.e. over confirmation seeds)", fontsize=9)
    for ax, split in ((left, "validation"), (right, "test")):
        ax.set_xlabel(axis_label("new-task", metric, hib, split))
        ax.set_ylabel(axis_label("old-task", metric, hib, split))
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _fit_to_methods(ax, xs, ys, margin=0.08) -> None:
    """Axis limits from the methods' points (not the pretrained model's, which can sit far away and squeeze every
    method into a corner); fixed here so later markers and reference lines do not widen them."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    if not len(xs) or not len(ys):
        return
    for lo, hi, setter in ((xs.min(), xs.max(), ax.set_xlim), (ys.min(), ys.max(), ax.set_ylim)):
        pad = (hi - lo) * margin or abs(hi) * margin or 1e-3
        setter(lo - pad, hi + pad)


def _pretrained(ax, runs: pd.DataFrame, split: str) -> None:
    """The pretrained model: a star, or, when it lies outside the methods' axes, an arrow at the edge towards it
    with its values in the legend."""
    old, new = runs[f"old_{split}_before"].mean(), runs[f"new_{split}_before"].mean()
    if not (np.isfinite(old) and np.isfinite(new)):
        return
    if _on_axes(ax, new, old):
        ax.scatter([new], [old], marker="*", s=150, color="black", label="pretrained", zorder=5)
    else:
        _off_axes(ax, new, old, marker="*", colour="black", label="pretrained, off the axes")


def _on_axes(ax, x, y) -> bool:
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    return min(x0, x1) <= x <= max(x0, x1) and min(y0, y1) <= y <= max(y0, y1)


def _off_axes(ax, x, y, *, marker, colour, label) -> None:
    """A point outside the axes: its marker on the edge nearest to it, an arrow pointing its way, its values in
    the legend (the axes stay fitted to the methods)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    cx, cy = min(max(x, x0), x1), min(max(y, y0), y1)
    ax.annotate("", xy=(cx, cy), xytext=(cx - 0.06 * (x1 - x0) * np.sign(x - cx),
                                         cy - 0.06 * (y1 - y0) * np.sign(y - cy)),
                arrowprops=dict(arrowstyle="-|>", color=colour), annotation_clip=False)
    ax.scatter([cx], [cy], marker=marker, s=120, color=colour, zorder=5, clip_on=False,
               label=f"{label} (new {x:.3g}, old {y:.3g})")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def _reference(ax, ref) -> None:
    if ref is not None and all(np.isfinite(ref)):
        ax.axhline(ref[0], color="gray", ls=":", lw=0.8)
        ax.axvline(ref[1], color="gray", ls=":", lw=0.8)


def plot_ablation(points: pd.DataFrame, param: str, palette: dict, title: str, path: Path) -> str:
    """Old and new validation metric against `param`, one line per arm, mean ± s.e. over the seeds of each
    point. The caller has checked that `param` is the only knob that varies; a one-value plot is refused."""
    if points[param].nunique() < 2:
        raise ValueError(f"ablation over {param} needs at least two values")
    metric, hib = str(points["metric_name"].iloc[0]), bool(points["higher_is_better"].iloc[0])
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE["wide"])
    for ax, col, name in zip(axes, ["old_val", "new_val"], ["old-task", "new-task"]):
        sns.lineplot(data=points, x=param, y=col, hue="arm", palette=palette, marker="o", errorbar="se",
                     err_style="bars", ax=ax)
        if param == "ratio":
            ax.set_xscale("log")
        ax.set_ylabel(axis_label(name, metric, hib, "validation"))
        ax.set_xlabel("ratio = λ_main / λ_ref" if param == "ratio" else param)
    n = points.groupby(["arm", param]).size()
    fig.suptitle(f"{title} (mean ± s.e. over {n.min()}–{n.max()} seeds per point)" if n.max() > 1 else
                 f"{title} (one seed per point: no error bars)", fontsize=9)
    return _save(fig, path)


def plot_ablation_test(ablations: list[dict], palette: dict, title: str, path: Path) -> str:
    """The ablation table's numbers: old and new test metric against the knob, one line per PROFIT arm, mean ±
    s.e. over confirmation seeds (no bar for n = 1), the confirmed knee ringed. `ablations`: stats.ablation_cells
    entries of one group and knob."""
    knob = ablations[0]["knob"]
    metric, hib = str(ablations[0]["metric_name"]), bool(ablations[0]["higher_is_better"])
    scale = 100.0 if metric == "accuracy" else 1.0
    values = [p["value"] for ab in ablations for p in ab["points"]]
    numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values)
    slot = {v: i for i, v in enumerate(dict.fromkeys(values))}  # a non-numeric knob: one slot per value
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE["wide"])
    for ax, col, name in zip(axes, ["old_test", "new_test"], ["old-task", "new-task"]):
        for ab in ablations:
            pts = [p for p in ab["points"] if p[col].n > 0]
            x = np.array([float(p["value"]) if numeric else slot[p["value"]] for p in pts], dtype=float)
            y = np.array([p[col].mean for p in pts]) * scale
            err = np.array([p[col].se if p[col].n > 1 else 0.0 for p in pts]) * scale
            ax.errorbar(x, y, yerr=err, fmt="-o", color=palette[ab["arm"]], label=ab["arm"], capsize=3)
            knee = [i for i, p in enumerate(pts) if p["knee"]]
            ax.scatter(x[knee], y[knee], s=160, facecolors="none", edgecolors="black", zorder=5,
                       label="confirmed knee" if ab is ablations[0] else None)
        if knob == "ratio" and numeric:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(list(slot.values()), [str(v) for v in slot])
        ax.set_xlabel("ratio = λ_main / λ_ref" if knob == "ratio" else knob)
        unit = " (%)" if metric == "accuracy" else ""
        ax.set_ylabel(axis_label(name, metric + unit, hib, "test"))
        ax.legend(fontsize=7)
    fig.suptitle(f"{title} (mean ± s.e. over confirmation seeds)", fontsize=9)
    return _save(fig, path)


def plot_pretrain(summaries: dict, metric: str, hib: bool, title: str, path: Path) -> str:
    """Pretraining: each backbone's mean old-task validation curve over its checkpoint seeds, ± s.e. shaded.
    `summaries`: model → stats.pretrain_summary."""
    scale = 100.0 if metric == "accuracy" else 1.0
    fig, ax = plt.subplots(figsize=FIGSIZE["small"])
    colours = dict(zip(sorted(summaries), sns.color_palette("tab10", max(len(summaries), 1))))
    for model, s in sorted(summaries.items()):
        x, y = s["curve"].index.to_numpy(float), s["curve"].to_numpy(float) * scale
        se = s["curve_se"].fillna(0.0).to_numpy(float) * scale
        ax.plot(x, y, marker="o", ms=3, color=colours[model], label=f"{model} (n={s['n']})")
        ax.fill_between(x, y - se, y + se, color=colours[model], alpha=0.25)
    ax.set_xlabel("evaluation")
    ax.set_ylabel(axis_label("old-task", metric + (" (%)" if metric == "accuracy" else ""), hib, "validation"))
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()  # the canvas stays FIGSIZE × DPI: only the axes move
    return _save(fig, path)


def plot_curves(hist: pd.DataFrame, run_arm: dict, palette: dict, metric: str, hib: bool, title: str, path: Path,
                xlabel: str) -> str:
    """Validation metrics per evaluation (step 0 = the pretrained model), one line per run in its arm's colour."""
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE["wide"])
    for ax, key, name in zip(axes, ["old_val", "new_val"], ["old-task", "new-task"]):
        for run, g in hist[hist["key"] == key].groupby("run"):
            g = g.sort_values("step")
            ax.plot(g["step"], g["value"], marker="o", ms=3, color=palette[run_arm[run]], label=run)
        ax.set_ylabel(axis_label(name, metric, hib, "validation"))
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# PROFIT's diagnostics in words (profit_bench.optim.DIAGNOSTICS): panel title, y-axis label.
DIAGNOSTIC_WORDS = {
    "profit_projected_frac": ("share of main steps projected", "fraction of main steps (0–1)"),
    "profit_cos_g_delta": ("cos(g, Δ) before the projection", "cosine (−1 to 1)"),
    "profit_perp_ratio": ("‖projected g‖ / ‖g‖", "ratio (1 = not projected)"),
    "profit_delta_rel": ("‖Δ‖ / ‖θ_ref‖ (reference displacement)", "relative norm"),
    "profit_delta_lost": ("Δ lost to rounding", "relative norm"),
}


def plot_diagnostics(hist: pd.DataFrame, run_config: dict, title: str, path: Path, xlabel: str) -> str:
    """PROFIT's diagnostics (profit_* metrics) per evaluation, one panel per diagnostic titled in words; one colour
    per configuration (`run_config`: run → its configuration in words), its seeds drawn as lines of that colour and
    named once in the legend."""
    keys = sorted(hist["key"].unique())
    configs = list(dict.fromkeys(run_config[r] for r in sorted(hist["run"].unique())))
    colours = dict(zip(configs, sns.color_palette("tab10" if len(configs) <= 10 else "tab20", len(configs))))
    fig, axes = plt.subplots(1, len(keys), figsize=FIGSIZE["wide"], squeeze=False)
    for ax, key in zip(axes[0], keys):
        named = set()
        for run, g in hist[hist["key"] == key].groupby("run"):
            g, config = g.sort_values("step"), run_config[run]
            ax.plot(g["step"], g["value"], marker="o", ms=3, color=colours[config], alpha=0.8,
                    label=None if config in named else config)
            named.add(config)
        words, unit = DIAGNOSTIC_WORDS.get(key, (key.removeprefix("profit_").replace("_", " "), "value"))
        ax.set_title(words, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=7,
               title="configuration (lines: its confirmation seeds)", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 4), 1, 0.95))  # the canvas keeps its size
    return _save(fig, path)


def plot_cost(rows: pd.DataFrame, palette: dict, title: str, path: Path) -> str:
    """Exactly Table 11's numbers: time per main step (ms) and per trial (s), mean ± s.e., and the tensor
    accounting of memory (MiB)."""
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE["wide"])
    x = np.arange(len(rows))
    colours = [palette[a] for a in rows["arm"]]
    names = [f"{m}\n{a}\n({'PROFIT over ' if p else ''}{o})"
             for m, a, o, p in zip(rows["backbone"], rows["arm"], rows["optimizer"], rows["is_profit"])]
    axes[0].bar(x, rows["step_ms"], yerr=rows["step_ms_se"].fillna(0), color=colours, capsize=3)
    axes[0].set_ylabel("ms per main step (PROFIT: n_ref + 1 batches)")
    axes[0].set_title("time per main step", fontsize=8)
    axes[1].bar(x, rows["trial_s"], yerr=rows["trial_s_se"].fillna(0), color=colours, capsize=3)
    axes[1].set_ylabel("s per trial (wall, evaluations included)")
    axes[1].set_title("time per trial", fontsize=8)
    bottom = np.zeros(len(rows))
    for col, hatch, name in (("params_mib", "", "parameters"), ("grads_mib", "//", "gradients"),
                             ("state_mib", "xx", "PROFIT / method state")):
        axes[2].bar(x, rows[col], bottom=bottom, color=colours, hatch=hatch, edgecolor="black", label=name)
        bottom += rows[col].to_numpy(float)
    axes[2].set_ylabel("MiB, tensor accounting (not process RSS)")
    axes[2].set_title("memory", fontsize=8)
    axes[2].set_ylim(0, max(bottom.max(), 1e-9) * 1.4)  # room for the legend above the bars
    axes[2].legend(fontsize=7, loc="upper center", ncol=2)
    for ax in axes:
        ax.set_xticks(x, names, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()  # the canvas stays FIGSIZE × DPI: only the axes move
    return _save(fig, path)
