"""optstudy's dashboards: the sensitivity report of a study and the live dashboard over every study of a storage.

This folder is the repository's top-level ``dashboards/``; setup.py installs it as the package ``optstudy.dashboards``
(an editable install maps the name back here), so it imports the same from a checkout and from a wheel.

- ``write(study, out_dir)`` (``report``): ``optstudy study report``'s self-contained ``index.html`` plus its CSV tables;
- ``app``: ``optstudy dashboard``, a small page (``static/``) over a JSON API, the same views live;
- ``views``: one function per view, drawing it from the study's tables with ``figures``; both of the above call them.
"""

from optstudy.dashboards.report import write

__all__ = ["write"]
