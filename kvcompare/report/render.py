"""Rendering: a document.Report as Markdown (report.md, and tables for the terminal) or as one self-contained HTML
page (Vega libraries and specs inlined) that renders offline.

Both renderers walk the same Report.sections and only decide how a block looks; what is said, and in which
order, is settled before they see it (sections.py assembles it).
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from html import escape
from pathlib import Path

import altair as alt
import vl_convert

from kvcompare.report.charting import ChartFile
from kvcompare.report.document import Block, Definitions, Markdown, Remarks, Report, Table


def _link(path: Path, out_dir: Path) -> str:
    """path relative to out_dir, where the report file that links to it is written."""
    return Path(os.path.relpath(path, out_dir)).as_posix()


# --- Markdown ------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_md(table: Table, level: int = 3) -> str:
    """A table as Markdown: its heading at ``level``, the rows (or its empty-state text) and its note."""
    lines = [f"{'#' * level} {table.title}", ""]
    if table.rows:
        lines += [
            "| " + " | ".join(_cell(h) for h in table.headers) + " |",
            "|" + "---|" * len(table.headers),
        ]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    else:
        lines.append(f"_{table.empty}_")
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines) + "\n"


def _block_md(block: Block, out_dir: Path) -> list[str]:
    """A block as paragraphs of report.md (the caller puts a blank line between them)."""
    if isinstance(block, Table):
        return [table_md(block)]
    if isinstance(block, Markdown):
        return [block.text.strip() + "\n"]
    if isinstance(block, Definitions):
        return [block.lead + "\n", "\n".join(f"- **{term}**: {text}" for term, text in block.items.items()) + "\n"]
    if isinstance(block, Remarks):
        return [f"- {item}\n" for item in block.items]
    png, spec = _link(block.png, out_dir), _link(block.spec_path, out_dir)
    caption = f"_{block.caption}_\n\n" if block.caption else ""
    return [f"### {block.title}\n\n![{block.title}]({png})\n\n{caption}[Vega-Lite spec]({spec})\n"]


def render_markdown(report: Report, out_dir: Path) -> str:
    """The whole report; links are relative to out_dir, where report.md is written."""
    parts = [f"# {report.title}\n", *(f"> **Note:** {notice}\n" for notice in report.notices)]
    for section in report.sections:
        parts.append(f"## {section.heading}\n")
        if section.intro:
            parts.append(section.intro + "\n")
        for block in section.blocks:
            parts += _block_md(block, out_dir)
        if section.empty and not section.blocks:
            parts.append(f"_{section.empty}_\n")
    return "\n".join(parts)


# --- HTML ----------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; max-width: 1600px; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
td { white-space: nowrap; }
td:last-child, td.prose { white-space: normal; min-width: 16rem; }
th { background: #f3f3f3; }
.scroll { overflow-x: auto; }
.note { color: #555; font-size: 0.85rem; max-width: 70rem; }
.chart { margin: 1rem 0; }
#js-errors { color: #b00; white-space: pre-wrap; }
.notice { background: #fff4d6; border-left: 4px solid #d99a00; padding: 0.5rem 0.8rem; max-width: 70rem; }
summary { cursor: pointer; }
summary h2 { display: inline; }
"""

#: Installed before anything else runs: page errors land in #js-errors, where tests and readers see them.
ERROR_TRAP = """
function reportError(error) {
  var box = document.getElementById('js-errors');
  box.textContent += String((error && (error.stack || error.message)) || error) + '\\n';
  box.hidden = false;
}
window.addEventListener('error', function (event) { reportError(event.error || event.message); });
window.addEventListener('unhandledrejection', function (event) { reportError(event.reason); });
"""

EMBED = """
document.querySelectorAll('div.chart').forEach(function (div) {
  var spec = JSON.parse(document.getElementById('spec-' + div.dataset.chart).textContent);
  vegaEmbed(div, spec, {renderer: 'svg', actions: false}).catch(reportError);
});
"""


#: What the bundle runs: the libraries as the globals the embed script calls.
GLOBALS_SNIPPET = "window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;"


@cache
def vega_bundle() -> str:
    """Vega, Vega-Lite (the version Altair writes) and Vega-Embed in one script, from vl-convert: offline."""
    wanted = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    version = wanted if wanted in vl_convert.get_vegalite_versions() else None
    # Only '</script' ends a script element early; '<\\/script' means the same in a JS string or regex.
    return re.sub(
        r"</(script)",
        r"<\\/\1",
        vl_convert.javascript_bundle(GLOBALS_SNIPPET, vl_version=version),
        flags=re.IGNORECASE,
    )


def _json_script(value: object) -> str:
    """JSON that cannot end or confuse its <script> element: every '<' as the JSON escape \\u003c."""
    return json.dumps(value).replace("<", "\\u003c")


def _inline(text: str) -> str:
    """Escape, then the little inline Markdown the notes and protocol use: `code` and **bold**."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


BULLET = re.compile(r"^\s*[-*]\s+")


def markdown_blocks(text: str) -> str:
    """Headings, bullet lists and paragraphs: enough for PROTOCOL_MD without a Markdown dependency."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        heading = re.match(r"(#{1,6})\s+(.*)", lines[0])
        if heading and len(lines) == 1:
            level = min(len(heading.group(1)) + 2, 6)
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif BULLET.match(lines[0]):
            items: list[list[str]] = []
            for line in lines:  # an indented line continues the item above it
                if BULLET.match(line):
                    items.append([BULLET.sub("", line)])
                else:
                    items[-1].append(line.strip())
            blocks.append("<ul>" + "".join(f"<li>{_inline(' '.join(item))}</li>" for item in items) + "</ul>")
        else:
            blocks.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(blocks)


#: A cell longer than this is prose (a reason, evidence) and wraps; shorter cells (figures) never break.
PROSE_CHARS = 40


def _td(text: str) -> str:
    return f'<td class="prose">{escape(text)}</td>' if len(text) > PROSE_CHARS else f"<td>{escape(text)}</td>"


def table_html(table: Table, level: int = 3) -> str:
    """A table as HTML: its heading at ``level``, the rows in a scrolling box (or its empty-state text) and its note."""
    parts = [f"<h{level}>{escape(table.title)}</h{level}>"]
    if table.rows:
        head = "".join(f"<th>{escape(h)}</th>" for h in table.headers)
        body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in table.rows)
        parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
    else:
        parts.append(f'<p class="empty"><em>{_inline(table.empty)}</em></p>')
    if table.note:
        parts.append(f'<p class="note">{_inline(table.note)}</p>')
    return "\n".join(parts)


def chart_html(chart: ChartFile, out_dir: Path) -> str:
    """A chart as HTML: its title, the element the page draws it in, and links to its PNG and Vega-Lite spec
    (relative to ``out_dir``)."""
    png, spec = escape(_link(chart.png, out_dir)), escape(_link(chart.spec_path, out_dir))
    caption = f'<p class="note">{_inline(chart.caption)}</p>\n' if chart.caption else ""
    return (
        f"<h3>{escape(chart.title)}</h3>\n"
        f'<div class="chart scroll" id="chart-{chart.name}" data-chart="{chart.name}"></div>\n'
        f"{caption}"
        f'<p class="note"><a href="{png}">PNG</a> · <a href="{spec}">Vega-Lite spec</a></p>\n'
        f'<script type="application/json" id="spec-{chart.name}">{_json_script(chart.spec)}</script>'
    )


def _block_html(block: Block, out_dir: Path) -> str:
    if isinstance(block, Table):
        return table_html(block)
    if isinstance(block, Markdown):
        return markdown_blocks(block.text)
    if isinstance(block, Definitions):
        items = "".join(
            f"<li><strong>{escape(term)}</strong>: {_inline(text)}</li>" for term, text in block.items.items()
        )
        return f"<p>{_inline(block.lead)}</p><ul>{items}</ul>"
    if isinstance(block, Remarks):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>" if block.items else ""
    return chart_html(block, out_dir)


def render_html(report: Report, out_dir: Path) -> str:
    """The whole page; links to PNG and spec files are relative to out_dir, where index.html is written."""
    body = [
        f"<h1>{escape(report.title)}</h1>",
        '<pre id="js-errors" hidden></pre>',
        *(f'<p class="notice"><strong>Note:</strong> {_inline(notice)}</p>' for notice in report.notices),
    ]
    for section in report.sections:
        heading = f"<h2>{escape(section.heading)}</h2>"
        body.append(f"<details><summary>{heading}</summary>" if section.collapsed else heading)
        if section.intro:
            body.append(f"<p>{_inline(section.intro)}</p>")
        body += [_block_html(block, out_dir) for block in section.blocks]
        if section.empty and not section.blocks:
            body.append(f"<p><em>{_inline(section.empty)}</em></p>")
        if section.collapsed:
            body.append("</details>")
    scripts = f"<script>{vega_bundle()}</script>\n<script>{EMBED}</script>" if report.charts.charts else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(report.title)}</title><style>{STYLE}</style><script>{ERROR_TRAP}</script></head>\n"
        "<body>\n" + "\n".join(body) + f"\n{scripts}\n</body></html>\n"
    )
