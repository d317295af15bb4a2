"""HTML and Markdown reports of a run directory: tables, charts and recommendations."""

from kvcompare.report.build import ReportPaths, build_report
from kvcompare.report.load import ReportError
from kvcompare.report.terminal import summary_table

__all__ = ["ReportError", "ReportPaths", "build_report", "summary_table"]
