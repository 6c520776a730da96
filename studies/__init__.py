"""optstudy's shipped study files. Installed, this directory is the package ``optstudy._studies`` (see setup.py), so
that ``optstudy study run NAME`` finds them by name from any directory."""
