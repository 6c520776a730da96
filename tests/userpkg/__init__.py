"""A user's own package, as a user of optstudy writes one: models and data named by ``_target_`` in configs.

Not part of the test suite's package: tests put ``tests/`` on ``PYTHONPATH`` (``sys.path``) and name these as
``userpkg.nets.Net``, as a user names ``mypkg.nets.Net``.
"""
