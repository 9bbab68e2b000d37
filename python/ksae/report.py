"""A one-page report of a run: ``report.md`` and a self-contained ``report.html``.

Both files hold the same content: a title, optional notes, a two-column table of the run's
scalar metrics, an optional multi-column table (one row per sweep point, say) and the
figures, referenced by file names relative to the report's directory so the directory can be
moved or archived as a whole. Text is escaped for each format (``html.escape`` for HTML; a
backslash before the characters Markdown would read as markup, ``|`` included), so metric
names and notes are shown literally. No dependency beyond the standard library.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

__all__ = ["write_report", "format_value"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
figcaption { color: #555; margin-top: 0.3em; }
""".strip()


def format_value(value: Any) -> str | None:
    """A table cell for a scalar: ints in full, floats to 4 significant digits (whole numbers
    from 10^4 up to 10^12 without an exponent), NaN/inf spelled out; ``None`` for containers
    (dicts, lists, arrays of more than one dimension...), which a flat table cannot show."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (Mapping, list, tuple, set, frozenset, np.ndarray)):
        return None
    if value is None or isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        magnitude = abs(value)
        if 1e-3 <= magnitude < 1e4:
            return f"{value:.4g}"
        if 1e4 <= magnitude < 1e12:
            return f"{value:.0f}"
        return f"{value:.3e}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


# An underscore between two letters or digits can neither open nor close emphasis
# (CommonMark's flanking rules), so it is left alone to keep names like test_mse readable.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]<>|#&~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# At the start of a paragraph these would make a list item or a heading underline.
_MARKDOWN_BLOCK_START = re.compile(r"^([-+=]|\d+(?=[.)]))")


def _md(text: str) -> str:
    """``text`` as literal Markdown inline content on one line."""
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), " ".join(text.split()))


def _md_paragraph(text: str) -> str:
    """``text`` as one literal Markdown paragraph."""
    return _MARKDOWN_BLOCK_START.sub(lambda m: m.group(0) + "\\" if m.group(0)[0].isdigit()
                                     else "\\" + m.group(0), _md(text))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return lines


def _html_table(header: Sequence[str], rows: Sequence[Sequence[tuple[str, bool]]]) -> list[str]:
    """``rows`` of (text, is_number) cells; numbers are right-aligned."""
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = "".join(f'<td class="num">{html.escape(text)}</td>' if number else f"<td>{html.escape(text)}</td>"
                        for text, number in row)
        lines.append(f"<tr>{cells}</tr>")
    return lines + ["</table>"]


def _check_images(directory: Path, images: Any) -> list[tuple[str, str]]:
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(f"images: expected a list of (caption, filename) pairs, got {type(images).__name__}")
    checked = []
    for i, item in enumerate(images):
        if (not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2
                or not all(isinstance(part, str) for part in item)):
            raise TypeError(f"images[{i}]: expected a (caption, filename) pair of str, got {item!r}")
        caption, filename = item
        relative = Path(filename)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise ValueError(f"images[{i}]: expected a file name relative to the report directory "
                             f"(so the page can move with it), got {filename!r}")
        if not (directory / relative).is_file():
            raise FileNotFoundError(f"images[{i}]: {filename!r} not found in {str(directory)!r}")
        checked.append((caption, relative.as_posix()))
    return checked


def _check_table(table: Any) -> tuple[list[str], list[list[Any]]]:
    """Column names (in order of first appearance) and the cell values ('' where missing)."""
    if not isinstance(table, Sequence) or isinstance(table, (str, bytes)):
        raise TypeError(f"table: expected None or a list of dicts (one per row), got {type(table).__name__}")
    columns: dict[str, None] = {}
    for i, row in enumerate(table):
        if not isinstance(row, Mapping) or not all(isinstance(key, str) for key in row):
            raise TypeError(f"table[{i}]: expected a dict with str keys, got {row!r:.80}")
        columns.update(dict.fromkeys(row))
    return list(columns), [[row.get(c, "") for c in columns] for row in table]


def write_report(directory: str | os.PathLike, title: str, metrics: Mapping[str, Any],
                 images: Sequence[tuple[str, str]], *, notes: str | None = None,
                 table: Sequence[Mapping[str, Any]] | None = None,
                 names: Mapping[str, str] | None = None) -> Path:
    """Write ``report.md`` and ``report.html`` into ``directory`` (created if needed) and
    return the path of ``report.html``.

    - ``title``: the page heading.
    - ``metrics``: a flat dict name -> scalar, shown as a two-column table (floats to 4
      significant digits, see ``format_value``); nested values such as a history dict or a
      list are left out.
    - ``images``: ``(caption, filename)`` pairs, filenames relative to ``directory`` and
      existing there (as ``ksae.plots.write_run_plots`` returns them).
    - ``notes``: plain text shown under the title, paragraphs split at blank lines.
    - ``table``: a list of dicts, one per row (e.g. per k of a sweep), shown as a table with
      one column per key in order of first appearance.
    - ``names``: readable names for metric names and table columns (``"test_mse"`` ->
      ``"test MSE"``); a name not in it is shown as it is.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a str or os.PathLike, got {type(directory).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title: expected a str, got {type(title).__name__}")
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a dict name -> value, got {type(metrics).__name__}")
    bad_keys = [key for key in metrics if not isinstance(key, str)]
    if bad_keys:
        raise TypeError(f"metrics: expected str names, got {bad_keys!r:.80}")
    if notes is not None and not isinstance(notes, str):
        raise TypeError(f"notes: expected None or a str, got {type(notes).__name__}")
    directory = Path(directory)
    figures = _check_images(directory, images)
    columns, cells = _check_table(table) if table is not None else ([], [])
    shown = names or {}
    columns = [shown.get(c, c) for c in columns]
    scalars = [(shown.get(name, name), value, text) for name, value in metrics.items()
               if (text := format_value(value)) is not None]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", notes or "") if p.strip()]

    md = [f"# {_md(title)}", ""]
    page = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>", f"<style>\n{_STYLE}\n</style>", "</head>", "<body>",
            f"<h1>{html.escape(title)}</h1>"]
    for paragraph in paragraphs:
        md += [_md_paragraph(paragraph), ""]
        page.append(f"<p>{html.escape(paragraph)}</p>")
    if scalars:
        md += ["## Metrics", ""] + _md_table(["metric", "value"], [[n, t] for n, _, t in scalars]) + [""]
        page += ["<h2>Metrics</h2>"] + _html_table(
            ["metric", "value"], [[(n, False), (t, _is_number(v))] for n, v, t in scalars])
    if cells:
        texts = [[format_value(v) or "" for v in row] for row in cells]
        md += ["## Results", ""] + _md_table(columns, texts) + [""]
        page += ["<h2>Results</h2>"] + _html_table(
            columns, [[(t, _is_number(v)) for t, v in zip(trow, row)] for trow, row in zip(texts, cells)])
    if figures:
        md += ["## Figures", ""]
        page.append("<h2>Figures</h2>")
    for caption, filename in figures:
        url = quote(filename)  # spaces and the like, so both formats read the link whole
        md += [f"![{_md(caption)}]({url})", ""] + ([f"*{_md(caption)}*", ""] if caption.strip() else [])
        page += [f'<figure><img src="{html.escape(url)}" alt="{html.escape(caption)}">',
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>"]
    page += ["</body>", "</html>"]

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text("\n".join(md).rstrip("\n") + "\n", encoding="utf-8")
    html_path = directory / "report.html"
    html_path.write_text("\n".join(page) + "\n", encoding="utf-8")
    return html_path
