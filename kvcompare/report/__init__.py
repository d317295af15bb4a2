"""HTML and Markdown reports of a run directory: tables, charts and recommendations.

data (numbers) -> content (sections, tables) and charts -> render (HTML, Markdown); build is what the CLI calls.
"""

from kvcompare.analysis import ReportError
from kvcompare.report.build import ReportPaths, build_report, summary_table

__all__ = ["ReportError", "ReportPaths", "build_report", "summary_table"]
