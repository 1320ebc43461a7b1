"""The toolkit of rayimgcls's HTML reports: a page shell, escaping, inlined images, sortable tables, figures.

A report is one file that opens from disk and fetches nothing: styles and the one script are inline, images
are data URIs, and the page's Content-Security-Policy allows exactly that (no network, no other script), so
even a string that slipped past escaping could not run. Every text that reaches the page goes through `esc`
unless it is `Html` built here: class names, paths and messages come from user files.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayimgcls import storage
from rayimgcls.text import printable

VOID = {"img", "meta", "br", "hr"}


class Html(str):
    """Markup that is already safe: every function here passes it through and escapes any other string."""


def esc(value: Any) -> Html:
    """Text -> HTML text (control characters made visible, as on the terminal); `Html` passes unchanged."""
    if isinstance(value, Html):
        return value
    return Html(html.escape(printable(str(value)), quote=True))


def tag(name: str, *body: Any, **attrs: Any) -> Html:
    """<name attrs>body</name>; `class_` stands for `class`, `data_v` for `data-v`; None/False attrs are left out."""
    parts = [name]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{esc(value)}"')
    if name in VOID:
        return Html(f"<{' '.join(parts)}>")
    return Html(f"<{' '.join(parts)}>{join(body)}</{name}>")


def join(parts: Iterable[Any]) -> Html:
    return Html("".join(esc(p) for p in parts))


def number(x: float | int | None, digits: int = 4) -> str:
    """A metric as the page shows it; undefined (None, NaN) is "n/a"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def file_url(path: str) -> str | None:
    """A file:// URL a browser opens for a local path; None for a URI (s3://...), which browsers cannot."""
    return None if storage.is_uri(path) else Path(path).resolve().as_uri()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image(data: bytes, alt: str, *, mime: str = "image/png", class_: str | None = None) -> Html:
    """An <img> with its bytes inlined."""
    return tag("img", src=data_uri(data, mime), alt=alt, class_=class_)


def stats(items: Sequence[tuple[str, str, float | int | None, str]]) -> Html:
    """The headline numbers as cards: (key, label, value, hint); `data-key` lets a test find each one."""
    return tag(
        "div",
        *(
            tag(
                "div",
                tag("div", label, class_="label"),
                tag("div", number(value), class_="value"),
                tag("div", hint, class_="hint") if hint else "",
                class_="stat",
                data_key=key,
                data_value=number(value, 17) if value is not None else "",
            )
            for key, label, value, hint in items
        ),
        class_="stats",
    )


def facts(items: Sequence[tuple[str, Any]]) -> Html:
    """Label: value lines (model, data root, ...)."""
    return tag("dl", *(Html(tag("dt", k) + tag("dd", v)) for k, v in items), class_="facts")


@dataclass(frozen=True)
class Column:
    title: str
    numeric: bool = False
    digits: int = 4


def table(columns: Sequence[Column], rows: Iterable[Sequence[Any]], *, sortable: bool = False) -> Html:
    """A table; numeric cells carry their exact value in `data-v`, which the sort script compares. A sortable
    table's headers are buttons (keyboard and screen reader friendly)."""
    head = join(
        tag(
            "th",
            tag("button", c.title, type="button") if sortable else c.title,
            class_="num" if c.numeric else None,
            data_type="num" if c.numeric else "text",
        )
        for c in columns
    )
    body = join(
        tag("tr", *(_cell(c, v) for c, v in zip(columns, row, strict=True)))
        for row in rows  # an iterable, so a long table is built row by row
    )
    return tag(
        "div",
        tag("table", tag("thead", tag("tr", head)), tag("tbody", body), class_="sortable" if sortable else None),
        class_="table-wrap",
    )


def _cell(column: Column, value: Any) -> Html:
    if not column.numeric or isinstance(value, Html):
        return tag("td", value, class_="num" if column.numeric else None)
    exact = "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)
    return tag("td", number(value, column.digits), class_="num", data_v=exact)


def section(anchor: str, title: str, *body: Any, note: str | None = None) -> Html:
    return tag("section", tag("h2", title), tag("p", note, class_="note") if note else "", *body, id=anchor)


Section = tuple[str, str, Html]  # anchor, title in the navigation, the section's HTML


def utc_now(seconds: bool = False) -> str:
    """When a report was written, for its subtitle."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else "") + " UTC")


def page(title: str, subtitle: Any, sections: Sequence[Section]) -> str:
    """The whole document: the sections in order, each linked from the navigation at the top."""
    links = tag("nav", *(tag("a", label, href=f"#{anchor}") for anchor, label, _ in sections))
    return (
        "<!doctype html>\n"
        + tag(
            "html",
            tag(
                "head",
                Html('<meta charset="utf-8">'),
                Html(f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'),
                Html('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                tag("title", title),
                Html(f"<style>{STYLE}</style>"),
            ),
            tag(
                "body",
                tag("header", tag("h1", title), tag("div", subtitle, class_="subtitle"), links),
                tag("main", *(body for _, _, body in sections)),
                Html(f"<script>{SCRIPT}</script>"),
            ),
            lang="en",
        )
        + "\n"
    )


STYLE = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da;
  --bad: #cf222e; --good: #1a7f37; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { padding: 20px 24px 10px; border-bottom: 1px solid var(--line); background: var(--soft); }
h1 { margin: 0 0 4px; font-size: 22px; }
h2 { margin: 0 0 10px; font-size: 18px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { margin: 14px 0 6px; font-size: 15px; }
.subtitle { color: var(--muted); overflow-wrap: anywhere; }
nav { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-top: 10px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 24px 40px; }
section { margin-top: 26px; }
.note { color: var(--muted); margin: -4px 0 10px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.stat { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.stat .label { color: var(--muted); font-size: 13px; }
.stat .value { font-size: 24px; font-weight: 600; font-variant-numeric: tabular-nums; }
.stat .hint { color: var(--muted); font-size: 12px; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 14px 0 0; }
.facts dt { color: var(--muted); }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.table-wrap { overflow-x: auto; max-height: 560px; overflow-y: auto; border: 1px solid var(--line);
  border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { padding: 5px 10px; text-align: left; border-bottom: 1px solid var(--line); overflow-wrap: break-word; }
th { position: sticky; top: 0; background: var(--soft); font-weight: 600; white-space: nowrap; }
th button { all: unset; cursor: pointer; }
th button::after { content: " \\2195"; color: var(--muted); }
th[aria-sort="ascending"] button::after { content: " \\2191"; color: var(--fg); }
th[aria-sort="descending"] button::after { content: " \\2193"; color: var(--fg); }
th button:focus-visible { outline: 2px solid var(--accent); }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:hover { background: var(--soft); }
.figures { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px; font-size: 13px; min-width: 0;
  overflow-wrap: anywhere; }
.card img { width: 100%; height: auto; aspect-ratio: 1; object-fit: contain; background: var(--soft);
  border-radius: 4px; display: block; image-rendering: auto; }
.card .path { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.card .true { color: var(--good); }
.card .pred { color: var(--bad); }
.pair { margin-bottom: 18px; }
.pair .grid { grid-template-columns: repeat(auto-fill, minmax(110px, 150px)); }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
@media (max-width: 600px) {
  header, main { padding-left: 12px; padding-right: 12px; }
  .stats { grid-template-columns: repeat(2, 1fr); }
  .stat .value { font-size: 20px; }
  .grid { grid-template-columns: repeat(2, 1fr); }
  .facts { grid-template-columns: 1fr; }
  .facts dd { margin-bottom: 6px; }
}
"""

# Sorts a table.sortable by the clicked column: numbers by data-v (missing values last), text by locale.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach(function (th, col) {
    th.querySelector("button").addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var numeric = th.dataset.type === "num";
      var key = function (row) {
        var cell = row.cells[col];
        if (!numeric) return cell.textContent;
        var v = parseFloat(cell.dataset.v);
        return isNaN(v) ? null : v;
      };
      var body = table.tBodies[0];
      var rows = Array.from(body.rows).map(function (r, i) { return [key(r), i, r]; });
      rows.sort(function (a, b) {
        if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
        var d = numeric ? a[0] - b[0] : a[0].localeCompare(b[0]);
        return (up ? d : -d) || a[1] - b[1];
      });
      rows.forEach(function (r) { body.appendChild(r[2]); });
    });
  });
});
"""


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


# Only our own style and script (by hash) and inlined images; nothing from the network or the disk.
CSP = (
    f"default-src 'none'; img-src data:; style-src 'sha256-{_sha256(STYLE)}'; "
    f"script-src 'sha256-{_sha256(SCRIPT)}'; base-uri 'none'; form-action 'none'"
)
