"""One small document model rendered twice, so ``report.md`` and ``report.html`` never drift.

Markdown links the PNGs relatively (they sit next to it); the HTML inlines them as
base64 ``data:`` URIs, so ``report.html`` is one self-contained file that can be
mailed or moved on its own. Every piece of text from a run (paths, method and
client names) goes through ``html.escape`` in HTML and has ``|`` escaped in
Markdown tables.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TableBlock:
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns


@dataclass
class FigureBlock:
    path: Path  # inside the output directory
    caption: str


Block = str | TableBlock | FigureBlock


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, TableBlock):
                out += _md_table(block)
            elif isinstance(block, FigureBlock):
                out.append(f"![{_md_text(block.caption)}]({block.path.name})")
            else:
                out.append(block)
            out.append("")
    return "\n".join(out)


def to_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, TableBlock):
                body.append(_html_table(block))
            elif isinstance(block, FigureBlock):
                data = base64.b64encode(block.path.read_bytes()).decode("ascii")
                caption = html.escape(block.caption)
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
            else:
                body.append(f"<p>{html.escape(block)}</p>")
    return HTML_TEMPLATE.format(title=html.escape(title), body="\n".join(body))


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; }}
th {{ background: #f3f3f3; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ margin: 1em 0; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _md_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(table: TableBlock) -> list[str]:
    rule = ["---:" if i in table.right else "---" for i in range(len(table.headers))]
    rows = [table.headers, *table.rows]
    lines = ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in rows]
    return [lines[0], "| " + " | ".join(rule) + " |", *lines[1:]]


def _html_table(table: TableBlock) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    rows = [
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(c)}</td>'
            if i in table.right
            else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in table.rows
    ]
    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )
