"""HTML pieces of the reports, rendered by Jinja2 templates with autoescaping: tables, images, notes, sections, pages.

The model report and the run report build their pages from these, so both escape text the same way
and share one page shell.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import jinja2
from markupsafe import Markup

from mednets.reports.figures import figure_to_base64

__all__ = ["RUN_CSS", "MODEL_CSS", "fmt", "image", "note", "page", "section", "table"]

_ENVIRONMENT = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)

_TABLE = _ENVIRONMENT.from_string(
    "<table><thead><tr>{% for h in header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>"
    '{% for css, row in rows %}<tr{% if css %} class="{{ css }}"{% endif %}>'
    "{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>"
)
_IMAGE = _ENVIRONMENT.from_string(
    '<img alt="{{ alt }}"{% if css %} class="{{ css }}"{% endif %} src="data:image/png;base64,{{ data }}">'
)
_NOTE = _ENVIRONMENT.from_string('<p class="note">{{ text }}</p>')
_SECTION = _ENVIRONMENT.from_string('<section id="{{ anchor }}"><h2>{{ title }}</h2>{{ content }}</section>')
_PAGE = _ENVIRONMENT.from_string(
    "<!DOCTYPE html><html><head><meta charset='utf-8'><title>{{ title }}</title><style>{{ css }}</style></head>"
    "<body>{{ body }}</body></html>"
)

RUN_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1280px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .subtitle { color: #666; margin-top: 0; }
nav a { margin-right: 1rem; } section { border-top: 1px solid #ddd; margin-top: 1.5rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f3f7; } pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }
img { max-width: 100%; } details { margin-bottom: 1rem; }
tr.good td { background: #eef8ee; } tr.bad td { background: #fbeaea; }
.note { color: #555; font-style: italic; }
.case { display: flex; gap: 1rem; align-items: flex-start; } .case img { width: 50%; }
.case > div { flex: 1; min-width: 0; overflow-x: auto; } .case table { font-size: 0.75rem; white-space: nowrap; }
.row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.cards { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1rem 0; }
.card { border: 1px solid #ccd6e0; border-radius: 6px; padding: 0.6rem 1rem; min-width: 9rem; background: #f7f9fc; }
.card .value { font-size: 1.5rem; font-weight: 600; } .card .label { color: #555; font-size: 0.85rem; }
"""

MODEL_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f0f3f7; } pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; }
img { max-width: 100%; } details { margin-bottom: 1rem; }
"""


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: fixed digits for floats, "n/a" for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; `row_classes` gives each row a CSS class (e.g. "good", "bad")."""
    rows = list(rows)
    classes = list(row_classes) if row_classes else [""] * len(rows)
    return _TABLE.render(
        header=[str(h) for h in header], rows=[(c, [str(v) for v in r]) for c, r in zip(classes, rows, strict=True)]
    )


def image(figure: Any, alt: str, css: str = "") -> str:
    """A matplotlib figure (or base64 PNG text) as an inline image."""
    data = figure if isinstance(figure, str) else figure_to_base64(figure)
    return _IMAGE.render(alt=alt, css=css, data=data)


def note(text: str) -> str:
    """A grey note paragraph."""
    return _NOTE.render(text=text)


def section(anchor: str, title: str, *content: str) -> tuple[str, str, str]:
    """A page section (anchor, title, HTML); `content` is already HTML."""
    return anchor, title, _SECTION.render(anchor=anchor, title=title, content=Markup("".join(content)))


def page(title: str, css: str, body: str) -> str:
    """A whole self-contained page; `body` is already HTML."""
    return _PAGE.render(title=title, css=Markup(css), body=Markup(body))
