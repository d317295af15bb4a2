"""The document model of a report: a title, notices, and sections of blocks (tables, Markdown, definitions,
remarks, charts), all text already worded and formatted.

The HTML page and the Markdown file (render.py) walk the one list of sections that sections.assemble builds,
so neither can add, drop, reorder or reword a section. Text is inline Markdown (`code`, **bold**) throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from kvcompare.report.charting import ChartFile, ChartSet


@dataclass(frozen=True)
class Table:
    """A titled grid of already formatted cells; `empty` is shown instead when there are no rows."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    empty: str = "none"


@dataclass(frozen=True)
class Markdown:
    """Headings, bullet lists and paragraphs of Markdown, shown as written (the protocol)."""

    text: str


@dataclass(frozen=True)
class Definitions:
    """A lead sentence and a list of terms, each with what it means (the recommendation rules)."""

    lead: str
    items: dict[str, str]


@dataclass(frozen=True)
class Remarks:
    """A list of short remarks (charts not drawn, files not read); nothing at all when empty."""

    items: list[str]


Block: TypeAlias = Table | Markdown | Definitions | Remarks | ChartFile


@dataclass(frozen=True)
class Section:
    """A heading and its blocks, shown in order."""

    heading: str
    blocks: Sequence[Block]
    intro: str = ""  # a paragraph under the heading
    empty: str = ""  # shown instead of the blocks when there are none
    collapsed: bool = False  # HTML: folded under its heading until opened (the protocol)


@dataclass(frozen=True)
class Report:
    """A whole report: its title, notices at the top, then its sections in reading order."""

    title: str
    sections: list[Section]
    charts: ChartSet  # the files written, also held by the Charts section
    notices: list[str] = field(default_factory=list)  # shown at the top, before any section
