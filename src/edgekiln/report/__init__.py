from edgekiln.report.writer import md_table, new_figure, save_figure, write_report

__all__ = ["md_table", "new_figure", "save_figure", "write_report"]
