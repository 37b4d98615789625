"""Adapters that plug epmoe into other libraries (each imports its library lazily; none is a hard dependency)."""
