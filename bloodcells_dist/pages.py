"""Self-contained HTML pages (report, audit, label issues): plain strings, images embedded as small JPEG thumbnails.

A page opens from disk, offline: no script, no stylesheet or image fetched from anywhere. Every image is a
`data:` URI of a thumbnail (THUMB pixels on its longer side), so that thousands of them stay a few megabytes.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

THUMB = 72  # pixels on the longer side of a thumbnail: ~2-3 kB as a JPEG, enough to see the cell
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}pre{background:#f8f8f8;padding:.5em;overflow:auto;max-height:30em}
.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:%(w)dpx;font-size:11px;text-align:center}
figure img{display:block;margin:auto;max-width:%(w)dpx;max-height:%(w)dpx}figcaption{overflow-wrap:anywhere}
.pair{display:flex;gap:6px;align-items:flex-start;margin:4px 0;padding:4px;border:1px solid #eee}
.note{color:#666}nav a{margin-right:1em}.bad{color:#b00}
""".replace("%(w)d", str(THUMB + 24))


@dataclass(frozen=True)
class Tile:
    """One image of a gallery: its thumbnail URI and caption lines (plain text), and a tooltip (its path)."""

    uri: str
    caption: Sequence[str]
    title: str = ""


def esc(value: object) -> str:
    """Text as HTML (quotes escaped too)."""
    return html.escape(str(value), quote=True)


def thumbnail(data: bytes, size: int = THUMB) -> str:
    """An image's bytes as a `data:` URI of a JPEG thumbnail; an undecodable image gives ''."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size * 2, size * 2))  # JPEG: decode at a reduced scale, much faster
            small = image.convert("RGB")
            small.thumbnail((size, size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError):
        return ""
    out = io.BytesIO()
    small.save(out, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def file_thumbnail(path: Path) -> str:
    """thumbnail() of a file; '' where it cannot be read."""
    try:
        return thumbnail(path.read_bytes())
    except OSError:
        return ""


def png_uri(data: bytes) -> str:
    """PNG bytes (a plot) as a `data:` URI."""
    return "data:image/png;base64," + base64.b64encode(data).decode()


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt

    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def tile_html(tile: Tile) -> str:
    """One figure: the thumbnail (or a placeholder where the image could not be read) and its caption."""
    img = (f'<img src="{tile.uri}" alt="{esc(tile.title)}">' if tile.uri
           else '<span class="bad">(unreadable)</span>')
    lines = "<br>".join(esc(line) for line in tile.caption)
    return f'<figure title="{esc(tile.title)}">{img}<figcaption>{lines}</figcaption></figure>'


def gallery(tiles: Iterable[Tile]) -> str:
    """Tiles in a wrapping grid."""
    return '<div class="grid">' + "".join(tile_html(t) for t in tiles) + "</div>"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], left: int = 1) -> str:
    """A table; cells are escaped unless wrapped in Raw; the first `left` columns are left-aligned."""
    def cell(tag: str, i: int, value: object) -> str:
        align = ' class="l"' if i < left else ""
        return f"<{tag}{align}>{value if isinstance(value, Raw) else esc(value)}</{tag}>"
    head = "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


class Raw(str):
    """HTML that table() must not escape (a link, a thumbnail)."""


def section(anchor: str, title: str, body: str) -> str:
    """A titled section with an anchor other parts of the page link to."""
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, sections: Sequence[tuple[str, str, str]], intro: str = "") -> str:
    """The whole page: a title, a navigation bar to each (anchor, title, body) section, the sections."""
    nav = "<nav>" + "".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections) + "</nav>"
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>{intro}{nav}{body}</body></html>\n")


def bar_svg(labels: Sequence[str], values: Sequence[float], *, width: int = 560, unit: str = "") -> str:
    """A horizontal bar chart as inline SVG (a histogram, a class balance), each bar labelled with its value."""
    height, peak = 18 * len(labels) + 10, max(values, default=0) or 1
    label_w = 8 * max((len(str(label)) for label in labels), default=4) + 10
    bars = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y, w = 5 + 18 * i, (width - label_w - 70) * value / peak
        bars.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end">{esc(label)}</text>'
                    f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="14" fill="#4a7ab5"/>'
                    f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{esc(f"{value:,}{unit}")}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12" '
            f'font-family="sans-serif">{"".join(bars)}</svg>')
