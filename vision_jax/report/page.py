"""The report as one self-contained HTML page: images embedded as data URIs, so the file can
be moved or mailed alone.

On load, a small inline script writes ``"<loaded>/<total>"`` (images with pixels / all images)
into ``<body data-images-loaded>``: a headless browser's dumped DOM shows whether every image
rendered.
"""

from __future__ import annotations

import base64
import html
import math
import pathlib
from collections.abc import Sequence

from vision_jax.report.tables import Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; }
.facts { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.2em 0.7em; text-align: right; border-bottom: 1px solid #ddd; }
th:first-child, td:first-child { text-align: left; }
tr.total td { font-weight: 600; }
img { max-width: 100%; }
"""

ON_LOAD = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def image(path: pathlib.Path, alt: str) -> str:
    """An ``<img>`` holding the PNG ``path`` as a data URI (``data-file``: its file name)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
        f'data-file="{html.escape(path.name)}">'
    )


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "&ndash;"
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def table(values: Table) -> str:
    """An HTML table of ``values``, its totals rows in bold."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in values.columns)
    rows = [(r, "") for r in values.rows] + [(r, ' class="total"') for r in values.totals]
    body = "".join(
        f"<tr{css}>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row, css in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def page(title: str, facts: Sequence[str], sections: Sequence[tuple[str, str]]) -> str:
    """The whole page: ``title``, a line of ``facts``, then each (heading, HTML) section."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>",
        '<body data-images-loaded="pending">',
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="facts">{" &middot; ".join(html.escape(f) for f in facts)}</p>',
    ]
    parts += [f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in sections]
    parts += [f"<script>{ON_LOAD}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"
