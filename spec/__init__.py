"""attnspec: an executable specification of attention, checked with Hypothesis."""

import warnings

# torch warns "Failed to initialize NumPy" at import when numpy is not installed (attnspec does not need
# it); silence exactly that warning, only while torch is first imported here, so every `attnspec` call
# does not print it and the user's own warning filters are left as they were.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from attnspec.errors import NotApplicable, Unsupported, UsageError, Violation  # noqa: E402
from attnspec.kinds import KINDS, Config  # noqa: E402
from attnspec.targets import Adapter  # noqa: E402

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("attnspec")
except PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"

__all__ = ["Adapter", "Config", "KINDS", "NotApplicable", "Unsupported", "UsageError", "Violation", "__version__"]
