"""Kernel tests: pytest puts this directory on ``sys.path`` (rootdir conftest without
``__init__.py``), so the test modules below it can ``import kernel_tiers`` (CPU tiers and
the tier skip markers)."""
