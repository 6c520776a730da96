"""Reports of optimizer studies: ``write(study, out_dir)`` -> a self-contained ``index.html`` plus its CSV tables."""

from optstudy.dashboards.report import write

__all__ = ["write"]
