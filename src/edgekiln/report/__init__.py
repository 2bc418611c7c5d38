from edgekiln.report.writer import envelope, md_table, new_figure, save_figure

__all__ = ["envelope", "md_table", "new_figure", "save_figure"]
