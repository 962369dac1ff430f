"""The leaderboard's figures, drawn with matplotlib: robustness curves along each epsilon
sweep, clean against robust accuracy (one point per defense), and each attack family's
robust numbers as grouped bars with their 95 % intervals.

Each figure is returned as SVG text, which the HTML page embeds, and written as a PNG file
next to it, for papers and READMEs. Output is deterministic (fixed SVG ids, no dates), so an
unchanged results folder gives unchanged files. A defense keeps its colour in every figure.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vlbench.store.files import atomic_write_bytes

#: the 10-colour qualitative palette most plotting tools default to; one per defense, in order
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
MARKERS = "osD^vP*Xhp"


@dataclass
class Figure:
    name: str      # the PNG file's stem
    caption: str
    svg: str


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; the same output everywhere
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "vlbench", "svg.fonttype": "none", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _value(cell, index: int = 0):
    """The ``index``-th number of a table cell (a list of ``Number``), or None."""
    return cell[index] if isinstance(cell, list) and len(cell) > index else None


def _save(plt, fig, name: str, caption: str, folder: Path) -> Figure:
    fig.tight_layout()
    svg = io.StringIO()
    fig.savefig(svg, format="svg", metadata={"Date": None})
    folder.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(folder / f"{name}.png", png.getvalue())
    text = svg.getvalue()
    return Figure(name, caption, text[text.index("<svg"):])  # the page inlines the element alone


def _label(row) -> str:
    """A defense label without the ⚑ flags a table row carries."""
    return str(row).split(" ⚑")[0]


def _colours(defenses: list[str]) -> dict[str, tuple[str, str]]:
    return {_label(d): (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, d in enumerate(defenses)}


def _plain(table: pd.DataFrame) -> pd.DataFrame:
    return table.rename(index=_label)


def curve_figure(base: str, tables: list[tuple[str, pd.DataFrame]], defenses: list[str], folder: Path) -> Figure:
    """Robust accuracy against epsilon per defense for the sweep ``base``: one panel per
    curve table (columns ``clean`` and each swept value; the clean value is drawn at 0)."""
    plt = _pyplot()
    style = _colours(defenses)
    tables = [(caption, _plain(table)) for caption, table in tables]
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.4), squeeze=False)
    for ax, (caption, table) in zip(axes[0], tables):
        swept = [c for c in table.columns if c != "clean"]
        try:
            xs = [float(c) for c in swept]
        except ValueError:  # values that are not numbers (e.g. "100it") are evenly spaced, in order
            xs = [float(i + 1) for i in range(len(swept))]
            ax.set_xticks([0.0, *xs], ["clean", *swept])
        else:
            if max(xs, default=0) >= 32:  # e.g. 1 … 255/255: a log scale keeps the small budgets apart
                ax.set_xscale("symlog", linthresh=1.0)
                ax.set_xticks([0.0, *xs], ["0", *swept])
        for defense in table.index:
            points = [(0.0, _value(table.at[defense, "clean"]))] if "clean" in table.columns else []
            points += [(x, _value(table.at[defense, c])) for x, c in zip(xs, swept)]
            points = [(x, n.value) for x, n in points if n is not None]
            if points:
                colour, marker = style[str(defense)]
                ax.plot(*zip(*points), color=colour, marker=marker, markersize=4, label=str(defense))
        ax.set_xlabel(f"{base}: the swept value (ε in 1/255 for a budget)")
        # a cell of two numbers (R@1 both ways) is drawn by its first
        ax.set_ylabel("R@1 image→text (%)" if "image→text" in caption else caption.split(" (%)")[0] + " (%)")
        ax.set_title(caption, fontsize=8, wrap=True)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, frameon=False, loc="upper right")
    return _save(plt, fig, f"curve-{_stem(base)}", f"{base}: robust accuracy against ε per defense "
                 "(ε = 0 is the clean value)", folder)


def clean_robust_figure(caption: str, table: pd.DataFrame, folder: Path) -> Figure | None:
    """Clean against robust accuracy, one point per defense, one panel per attack column."""
    attacks = [c for c in table.columns if c != "clean"]
    if "clean" not in table.columns or not attacks:
        return None
    table = _plain(table)
    plt = _pyplot()
    style = _colours([str(d) for d in table.index])
    columns = min(len(attacks), 4)
    rows = -(-len(attacks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(attacks):]:
        ax.set_visible(False)
    for ax, attack in zip(axes.flat, attacks):
        for defense in table.index:
            clean, robust = _value(table.at[defense, "clean"]), _value(table.at[defense, attack])
            if clean is None or robust is None:
                continue
            colour, marker = style[str(defense)]
            ax.scatter([clean.value], [robust.value], color=colour, marker=marker, s=22, label=str(defense))
            ax.annotate(str(defense), (clean.value, robust.value), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        ax.set_title(str(attack), fontsize=8)
        ax.set_xlabel("clean (%)")
        ax.set_ylabel("robust (%)")
        ax.grid(alpha=0.3)
    return _save(plt, fig, "clean-vs-robust", f"Clean against robust, one point per defense: {caption}", folder)


def family_bars_figure(caption: str, table: pd.DataFrame, families: dict[str, list[str]], folder: Path) -> Figure | None:
    """Per attack family (image, text, multimodal), each attack's robust number per defense as
    grouped bars with the 95 % interval."""
    table = _plain(table)
    families = {f: [a for a in table.columns if a in attacks] for f, attacks in families.items()}
    families = {f: attacks for f, attacks in families.items() if attacks}
    if not families:
        return None
    plt = _pyplot()
    defenses = [str(d) for d in table.index]
    style = _colours(defenses)
    widths = [max(len(a), 1) for a in families.values()]
    fig, axes = plt.subplots(1, len(families), figsize=(min(3.2 + 1.6 * sum(widths), 13), 3.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    bar = 0.8 / max(len(defenses), 1)
    for ax, (family, attacks) in zip(axes[0], families.items()):
        for i, defense in enumerate(defenses):
            xs, heights, errors = [], [], []
            for j, attack in enumerate(attacks):
                number = _value(table.at[table.index[i], attack])
                if number is not None:
                    xs.append(j + (i - (len(defenses) - 1) / 2) * bar)
                    heights.append(number.value)
                    errors.append(number.half_width or 0.0)
            ax.bar(xs, heights, width=bar, color=style[defense][0], yerr=errors, error_kw={"elinewidth": 0.6},
                   label=defense)
        ax.set_xticks(range(len(attacks)))
        ax.set_xticklabels(attacks, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{family} attacks", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(caption.split(" over ")[0])
    axes[0][-1].legend(fontsize=7, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    return _save(plt, fig, "attack-families", f"Robust numbers per attack family, with 95 % intervals: {caption}",
                 folder)


def _stem(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "figure"
