"""Test suite; a package so helpers import as `tests.services` / `tests.tools` anywhere."""
