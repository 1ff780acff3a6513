"""Typed, I/O-free domain objects."""
