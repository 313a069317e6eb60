"""kvbm's test suite. A package so that `tests.support` imports from the repository root
(pyproject.toml puts the root on pytest's path: `pythonpath = ["."]`)."""
