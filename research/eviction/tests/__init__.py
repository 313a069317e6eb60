"""Tests of research.eviction; pytest finds them through testpaths in pyproject.toml."""
