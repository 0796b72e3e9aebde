"""The exceptions geolink raises for problems the user can fix: one family, :class:`GeoLinkError`.

Every message names the input at fault and the fix, in the words of the Python API (parameter names, not command
line flags), so the ``geolink`` command can print it as one ``error: ...`` line and exit 2. Anything else that
escapes is a bug in geolink, shown with its traceback.

The subclasses also derive from the built-in exception a caller would have caught before this family existed
(``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class GeoLinkError(Exception):
    """Base class: a problem with what the user passed or pointed geolink at; the message says how to fix it."""


class InputError(GeoLinkError, ValueError):
    """A bad argument or input value: a malformed geometry, an unknown name, a tensor of the wrong shape."""


class ConfigError(GeoLinkError, ValueError):
    """An inconsistent or invalid configuration: a job config, an architecture JSON, a model ``config.json``."""


class DataError(GeoLinkError, ValueError):
    """A data file or dataset folder that cannot be read as what it claims to be (corrupt, truncated, empty)."""


class MissingWeightsError(GeoLinkError, FileNotFoundError):
    """Pretrained weights that are not where they were looked for (not bundled, not cached, no network)."""


class MissingInputError(GeoLinkError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingDependencyError(GeoLinkError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra to install."""
