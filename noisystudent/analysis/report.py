"""One self-contained HTML report per analysis: tables and every picture embedded (base64), so
the file can be mailed, attached to an MLflow run or opened offline."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from ..io import write_bytes_atomic

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} img{max-width:100%;margin:.4em 0}
.note{color:#555;font-size:.92em} .best{font-weight:bold;background:#eef8ee}
"""


@dataclass
class Section:
    id: str
    title: str
    parts: list[str] = field(default_factory=list)

    def text(self, text: str, css: str = "note") -> Section:
        self.parts.append(f'<p class="{css}">{html.escape(text)}</p>')
        return self

    def table(self, header: list[str], rows: list[list], highlight: set[tuple[int, int]] | None = None) -> Section:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = []
        for i, row in enumerate(rows):
            cells = "".join(
                f"<td{' class=best' if highlight and (i, j) in highlight else ''}>{html.escape(_fmt(v))}</td>"
                for j, v in enumerate(row)
            )
            body.append(f"<tr>{cells}</tr>")
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        return self

    def image(self, path: str | Path, alt: str) -> Section:
        p = Path(path)
        if p.is_file():
            data = base64.b64encode(p.read_bytes()).decode()
            self.parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        return self


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.4f}"
    return "-" if v is None else str(v)


def render_report(title: str, sections: list[Section], subtitle: str = "") -> str:
    nav = " · ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>{"".join(s.parts)}</section>' for s in sections
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='note'>{html.escape(subtitle)}</p><nav>{nav}</nav>{body}</body></html>"
    )


def write_report(path: str | Path, title: str, sections: list[Section], subtitle: str = "") -> Path:
    write_bytes_atomic(path, render_report(title, sections, subtitle).encode())
    return Path(path)
