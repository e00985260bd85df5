"""Test support: the helpers tests of every tier share, importable as `tests.support.*`.

Tests import helpers from here and from nowhere else: a unit test never imports from
tests/kernel, a kernel test never from tests/unit, and no test edits `sys.path`
(tests/unit/test_test_layout.py checks both)."""
