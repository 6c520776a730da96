"""Packaging that pyproject.toml cannot state: conf/, studies/ and dashboards/ stay at the repository's top level, and
are installed inside the package as ``optstudy._conf``, ``optstudy._studies`` (package resources) and
``optstudy.dashboards`` (the sensitivity report and the live dashboard: code, page and scripts); an editable install
maps them back to the repository. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "optstudy._conf", "optstudy._studies", "optstudy.dashboards"],
    package_dir={"": "src", "optstudy._conf": "conf", "optstudy._studies": "studies",
                 "optstudy.dashboards": "dashboards"},
    package_data={"optstudy._conf": ["*.yaml", "*/*.yaml"], "optstudy._studies": ["*.yaml", "*.sh"],
                  "optstudy.dashboards": ["static/*"]},
    include_package_data=False,  # package_data says it all (the manifest would warn that conf/model looks importable)
)
