"""The errors trakjax raises on purpose: one hierarchy, each also the matching built-in.

Every error that trakjax raises deliberately, about an argument, a store, a configuration or a
numerical condition, is a :class:`TrakjaxError`; catching that base catches them all. Each
subclass also derives from the built-in exception a user would expect, so ``except ValueError``
and ``except TypeError`` keep working::

    TrakjaxError
    ├── InvalidArgumentError (ValueError)   an argument's value is out of range or inconsistent
    │   ├── ConfigError                     a TOML run configuration, or a file it names
    │   └── NumericalError                  non-finite features, a singular kernel, an overflow
    ├── ArgumentTypeError (TypeError)       an argument of the wrong type
    └── StoreError (ValueError)             a store or run directory that does not match or is damaged
        └── InputsChangedError              a rerun whose inputs differ from the finished result's

Errors from elsewhere are not wrapped: an ``OSError`` from the file system (a full disk, a
permission) propagates as it is, and a bug surfaces as whatever it raised.
"""

from __future__ import annotations


class TrakjaxError(Exception):
    """Base of every error trakjax raises on purpose (a "documented error")."""


class InvalidArgumentError(TrakjaxError, ValueError):
    """An argument whose value is invalid; the message names it, its value and what is valid."""


class ArgumentTypeError(TrakjaxError, TypeError):
    """An argument of the wrong type; the message names it, its type and what is expected."""


class ConfigError(InvalidArgumentError):
    """A run configuration (TOML) or what it names that cannot be used; the CLI exits with 2."""


class NumericalError(InvalidArgumentError):
    """Inputs that give non-finite features, an overflowing Gram or a singular kernel."""


class StoreError(TrakjaxError, ValueError):
    """A store or run directory that does not match the request, or whose files are damaged."""


class InputsChangedError(StoreError):
    """A rerun into a finished result whose inputs (data, checkpoints, settings) changed."""
