"""optstudy's Hydra configs. Installed, this directory is the package ``optstudy._conf`` (see setup.py), so that
``optstudy.config`` finds it by package resource from any directory; Hydra ignores this file."""
