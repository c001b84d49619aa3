"""The package version, in a module of its own so that any layer (the store records it) can read it."""

__version__ = "0.2.0"
