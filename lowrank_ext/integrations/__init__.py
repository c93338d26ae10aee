"""Adapters for other libraries (import each submodule explicitly: they import their library)."""
