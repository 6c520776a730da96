"""Pieces of a self-contained HTML page: escaped text, tables, notes, images as data URIs, one inline style sheet.

Nothing on the page refers to another file or address, so it opens the same from a laptop, a cluster or an email.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

import pandas as pd

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; } .wide { overflow-x: auto; }
.note { background: #fff6dd; border-left: 4px solid #e0b000; padding: 0.3em 0.7em; }
.row { display: flex; flex-wrap: wrap; gap: 0.5em; } .row figure { margin: 0; flex: 1 1 32%; min-width: 300px; }
img { max-width: 100%; height: auto; } figcaption { font-size: 0.85em; color: #555; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; } dt { font-weight: 600; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


@dataclass
class Section:
    """One numbered section of the page and the CSV tables behind it (file name -> table)."""

    id: str
    title: str
    parts: list[str] = field(default_factory=list)
    csvs: dict[str, pd.DataFrame] = field(default_factory=dict)

    def render(self) -> str:
        return f'<section id="{self.id}">\n<h2>{esc(self.title)}</h2>\n' + "\n".join(self.parts) + "\n</section>"


def esc(value) -> str:
    return html.escape(str(value))


def number(value) -> str:
    """How the page writes a value: floats to 5 significant digits (the CSVs keep full precision), missing as —."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def table(df: pd.DataFrame, table_id: str) -> str:
    cells = df.astype(object).map(number)
    return '<div class="wide">' + cells.to_html(index=False, table_id=table_id, border=0, escape=True) + "</div>"


def transposed(df: pd.DataFrame, key: str, table_id: str) -> str:
    """A table with a row per column of ``df`` and a column per value of ``key`` (wide tables of few rows)."""
    cells = df.set_index(key).astype(object).map(number).T
    return table(cells.rename_axis(None, axis=1).reset_index(names="quantity"), table_id)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def para(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def img(png: bytes, alt: str, caption: str | None = None) -> str:
    image = f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'
    return f"<figure>{image}<figcaption>{esc(caption)}</figcaption></figure>" if caption else image


def definitions(items: dict[str, str]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items.items()) + "</dl>"


def page(title: str, sections: list[Section]) -> str:
    body = "\n".join(s.render() for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n")
