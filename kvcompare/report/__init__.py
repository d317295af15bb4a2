"""HTML and Markdown reports of a run directory: tables, charts and recommendations.

kvcompare.analysis (numbers) -> formatting and wording (cells, fixed texts) -> tables and notices, charts,
heatmaps and the accuracy-against-ratio chart of compression (on charting) -> sections (a document.Report, in
reading order) -> render (HTML, Markdown); build is what the CLI calls.
"""

from kvcompare.analysis import ReportError
from kvcompare.report.build import ReportPaths, build_report, summary_table

__all__ = ["ReportError", "ReportPaths", "build_report", "summary_table"]
