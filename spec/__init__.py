"""attnspec: an executable specification of attention, checked with Hypothesis.

The public names are imported on first use (PEP 562): importing the package imports no torch, so the pytest
plugin (``attnspec.plugin``, loaded by every pytest run where attnspec is installed) costs nothing in a run that
checks no targets."""

from importlib import import_module

_PUBLIC = {"Adapter": "attnspec.targets", "Config": "attnspec.kinds", "KINDS": "attnspec.kinds",
           "NotApplicable": "attnspec.errors", "Unsupported": "attnspec.errors", "UsageError": "attnspec.errors",
           "Violation": "attnspec.errors"}

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("attnspec")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

__all__ = [*sorted(_PUBLIC), "__version__"]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'attnspec' has no attribute {name!r}")
    import_module("attnspec._torch")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})
