"""Reports built afterwards from run directories (report.md, report.html, plots)."""

from mentor.report.build import build_report, compare_runs

__all__ = ["build_report", "compare_runs"]
