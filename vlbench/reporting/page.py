"""The HTML leaderboard: one self-contained page (inline style and script, figures as inline
SVG, no network) that a browser opens offline.

Modelled on what readers of RobustBench's leaderboard expect (ranked rows, clean and robust
side by side, each entry's paper, flags on numbers not reproduced), across image, text and
multimodal attacks: a ranked summary table per task family whose columns sort on a click,
the robustness curves of the sweeps, the figures, one collapsible table per dataset, a
section per defense (paper, parameters, training data, checkpoint, training time, flags,
claimed against measured), the notes and the run's provenance. Every label and note comes
from configs and result files and is escaped: text, never markup. The page renders a
:class:`vlbench.reporting.leaderboard.Board` (which imports this module to write it).
"""

from __future__ import annotations

import html
import json

import pandas as pd

from vlbench.reporting.numbers import column_leaders

STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dee7; --best: #fff3c4; --accent: #2456a6; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0; background: #f6f7f9; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; background: #fff; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px;
  border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
p.lead, .muted { color: var(--muted); }
td.muted { text-align: left; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
thead th { white-space: normal; min-width: 84px; vertical-align: bottom; }
.label { text-align: left; }
table.claims td.label { white-space: normal; min-width: 220px; }
thead th { background: #eef1f6; position: sticky; top: 0; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th::after { content: " \\2195"; color: #9aa3b2; font-size: 11px; }
table.sortable thead th[data-dir="desc"]::after { content: " \\2193"; color: var(--ink); }
table.sortable thead th[data-dir="asc"]::after { content: " \\2191"; color: var(--ink); }
td.best { background: var(--best); }
td a { color: var(--accent); text-decoration: none; }
.flag { display: inline-block; margin-left: 6px; padding: 0 6px; border-radius: 8px; font-size: 11px;
        background: #fde2e1; color: #8a1c17; }
.ok { color: #1b6e2a; } .below { color: #8a1c17; font-weight: 600; }
details { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; padding: 4px 10px; }
summary { cursor: pointer; font-weight: 600; }
figure { margin: 12px 0 20px; } figure svg { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; }
section.defense { border-top: 1px solid var(--line); padding-top: 4px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 6px 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
code { font-size: 12px; background: #f1f3f6; padding: 1px 4px; border-radius: 3px; overflow-wrap: anywhere; }
ul.notes li { margin: 4px 0; }
.model { color: var(--muted); font-size: 11px; }
"""

# Sorting: a click on a header orders the body rows by that column's data-v (numbers
# numerically, labels as text; cells with no value last), descending first, then toggling.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, col) {
    th.title = "sort by this column";
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "desc" ? "asc" : "desc";
      table.querySelectorAll("thead th").forEach(function (other) { delete other.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0];
      var key = function (row) {
        var v = row.children[col].dataset.v;
        if (v === undefined || v === "") return null;
        return isNaN(Number(v)) ? v.toLowerCase() : Number(v);
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var ka = key(a), kb = key(b);
        if (ka === null) return kb === null ? 0 : 1;
        if (kb === null) return -1;
        var order = ka < kb ? -1 : ka > kb ? 1 : 0;
        return dir === "desc" ? -order : order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def anchor(label: str) -> str:
    return "defense-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in label)


def _defense_cell(label: str, flags: dict[str, str], plain_labels: dict[str, str], models: dict[str, str]) -> str:
    row = plain_labels.get(label, label)
    flag = flags.get(row, "")
    badges = "".join(f'<span class="flag">{esc(part.strip())}</span>' for part in flag.split("⚑") if part.strip())
    model = f'<br><span class="model">{esc(models[row])}</span>' if models.get(row) else ""
    return (f'<td class="label" data-v="{esc(row)}"><a href="#{esc(anchor(row))}">{esc(row)}</a>{badges}{model}</td>')


def robust_score(row: pd.Series) -> float:
    """What a summary ranks rows by: the mean of a row's robust columns (its first number each)."""
    values = [cell[0].value for column, cell in row.items() if column != "clean" and isinstance(cell, list) and cell]
    return sum(values) / len(values) if values else float("-inf")


def table_html(numbers: pd.DataFrame, board, ranked: bool = False) -> str:
    """A sortable table of :class:`~vlbench.reporting.leaderboard.Number` lists: leaders in
    bold, the best of each column highlighted, each defense linked to its section; ``ranked``
    orders the rows by :func:`robust_score` and numbers them."""
    plain_labels = {f"{label} {flag}": label for label, flag in board.row_flags.items()}
    models = board.row_models()
    if ranked:
        order = sorted(range(len(numbers)), key=lambda i: -robust_score(numbers.iloc[i]))
        numbers = numbers.iloc[order]
    columns = list(numbers.columns)
    marks, best = {}, {}
    for column in columns:
        cells = list(numbers[column])
        marks[column] = column_leaders(cells)
        firsts = [(c[0].value, i) for i, c in enumerate(cells) if isinstance(c, list) and c]
        top = max((v for v, _ in firsts), default=None)
        best[column] = {i for v, i in firsts if v == top}
    labels = [*(["#"] if ranked else []), numbers.index.name or "defense"]
    head = "".join(f'<th class="label">{esc(c)}</th>' for c in labels) + "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = []
    for row, label in enumerate(numbers.index):
        cells = [f'<td class="label" data-v="{row + 1}">{row + 1}</td>'] if ranked else []
        cells.append(_defense_cell(str(label), board.row_flags, plain_labels, models))
        for column in columns:
            cell = numbers[column].iloc[row]
            if not isinstance(cell, list):
                cells.append('<td data-v="">–</td>')
                continue
            parts = [f"<strong>{esc(n.text())}</strong>" if row in marks[column][k] else esc(n.text())
                     for k, n in enumerate(cell)]
            klass = ' class="best"' if row in best[column] else ""
            # several numbers (R@1 both ways) stack, so a wide table stays narrow
            cells.append(f'<td data-v="{cell[0].value:.4f}"{klass}>{"<br>".join(parts)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _defense_section(info) -> str:
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in info.params.items()) or "none"
    seconds = (f"{info.training_seconds:.1f} s" if info.training_seconds is not None
               else "not trained here" if info.checkpoint == "not trained" else "trained in an earlier run (not recorded)")
    flags = "".join(f'<span class="flag">{esc(f.lstrip("⚑ "))}</span>' for f in info.flags) or "none"
    parts = [f'<section class="defense" id="{esc(anchor(info.label))}"><h3>{esc(info.label)}</h3>',
             f"<p>{esc(info.description)}</p>" if info.description else "",
             "<dl>",
             f"<dt>plugin</dt><dd><code>{esc(info.name)}</code> version {esc(info.version or '?')}</dd>",
             f"<dt>paper</dt><dd>{esc(info.paper)}</dd>",
             f"<dt>architecture</dt><dd>{esc(info.arch or 'not recorded')}</dd>",
             f"<dt>base model</dt><dd>{esc(info.base or 'not recorded')}"
             + (f" (<code>{esc(info.base_fingerprint[:16])}</code>)" if info.base_fingerprint else "") + "</dd>",
             f"<dt>weights from</dt><dd>{esc(info.weights_from)}</dd>",
             f"<dt>parameters</dt><dd><code>{esc(params)}</code></dd>",
             f"<dt>training data</dt><dd>{esc(info.training_data)}</dd>",
             f"<dt>checkpoint key</dt><dd><code>{esc(info.checkpoint)}</code></dd>",
             f"<dt>training time</dt><dd>{esc(seconds)}</dd>",
             f"<dt>flags</dt><dd>{flags}</dd>",
             "</dl>"]
    if info.comparisons:
        rows = []
        for c in info.comparisons:
            measured = "–" if c.measured is None else c.measured.text()
            klass = "below" if c.status == "below claimed" else "ok" if c.status == "consistent" else "muted"
            rows.append(f"<tr><td class=\"label\">{esc(c.claim.setting())}</td><td>{c.claim.value:.1f}</td>"
                        f"<td>{esc(measured)}</td><td class=\"{klass}\">{esc(c.status)}</td>"
                        f"<td class=\"label\">{esc(c.claim.source)}</td></tr>")
        parts.append('<div class="scroll"><table class="claims"><thead><tr><th class="label">setting</th>'
                     '<th>claimed</th><th>measured</th><th>status</th><th class="label">source</th></tr></thead>'
                     f'<tbody>{"".join(rows)}</tbody></table></div>')
    else:
        parts.append('<p class="muted">No claimed numbers declared.</p>')
    return "\n".join(p for p in parts if p) + "</section>"


def _provenance(found: dict) -> str:
    def items(mapping) -> str:
        return "".join(f"<li><code>{esc(k)}</code>: {esc(', '.join(v) if isinstance(v, list) else v)}</li>"
                       for k, v in mapping.items())

    commands = "".join(f"<li><code>{esc(c)}</code></li>" for c in found["commands"]) or \
        "<li>not recorded (the cells predate run records; their configs are in the cell files)</li>"
    revisions = {k: f"{v} cells" for k, v in found["code revisions"].items()}
    return (f"<dl><dt>folders</dt><dd>{esc(', '.join(found['folders']))} ({found['cells']} cells)</dd>"
            f"<dt>models</dt><dd>{esc(', '.join(found['models']))}</dd>"
            f"<dt>seeds</dt><dd>{esc(', '.join(found['seeds']))}</dd></dl>"
            f"<h3>Commands</h3><ul>{commands}</ul>"
            f"<h3>Code revisions</h3><ul>{items(revisions)}</ul>"
            f"<h3>Versions</h3><ul>{items(found['versions'])}</ul>"
            f"<h3>Evaluation subsets</h3><ul>{items(found['subsets'])}</ul>")


def html_page(board, drawn: list) -> str:
    summary = "\n".join(f"<h3>{esc(caption)}</h3>\n{table_html(table, board, ranked=True)}"
                        for caption, table in board.summaries)
    curves = "\n".join(f"<h3>{esc(caption)}</h3>\n{table_html(table, board)}" for _, caption, table in board.curves)
    figures = "\n".join(f'<figure id="figure-{esc(f.name)}">{f.svg}<figcaption>{esc(f.caption)} '
                        f'(<a href="figures/{esc(f.name)}.png">PNG</a>)</figcaption></figure>' for f in drawn)
    datasets = "\n".join(f"<details><summary>{esc(dataset)}</summary>{table_html(table, board)}</details>"
                         for dataset, table in board.per_dataset)
    defenses = "\n".join(_defense_section(info) for info in board.defenses)
    notes = "".join(f"<li>{esc(n)}</li>" for n in board.notes)
    sections = [("summary", "Summary", summary or '<p class="muted">No summary: fewer than two classification '
                 "datasets and no retrieval dataset.</p>"),
                ("curves", "Robustness curves", curves), ("figures", "Figures", figures),
                ("datasets", "Per dataset", datasets), ("defenses", "Defenses", defenses),
                ("notes", "Notes", f'<ul class="notes">{notes}</ul>'),
                ("provenance", "Provenance", _provenance(board.provenance))]
    shown = [(key, title, body) for key, title, body in sections if body]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in shown)
    body = "\n".join(f'<h2 id="{key}">{title}</h2>\n{content}' for key, title, content in shown)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>vlbench leaderboard</title><style>{STYLE}</style></head>\n<body><main>\n"
            f"<h1>vlbench leaderboard</h1><p class=\"lead\">{esc(board.title)} The summaries rank defenses by the "
            "mean of their robust columns; click a column header to sort. The highlighted cell is the best of its "
            "column; bold marks every value not significantly below it."
            f"</p><nav>{nav}</nav>\n{body}\n</main><script>{SCRIPT}</script></body></html>\n")
