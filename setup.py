"""Packaging that pyproject.toml cannot state: conf/ and studies/ stay at the repository's top level, and are installed
inside the package as ``optstudy._conf`` and ``optstudy._studies`` (package resources; an editable install maps them
back to the repository). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "optstudy._conf", "optstudy._studies"],
    package_dir={"": "src", "optstudy._conf": "conf", "optstudy._studies": "studies"},
    package_data={"optstudy._conf": ["*.yaml", "*/*.yaml"], "optstudy._studies": ["*.yaml", "*.sh"]},
    include_package_data=False,  # package_data says it all (the manifest would warn that conf/model looks importable)
)
