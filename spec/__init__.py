"""attnspec: an executable specification of attention, checked with Hypothesis."""

from attnspec.errors import NotApplicable, Unsupported, UsageError, Violation
from attnspec.kinds import KINDS, Config
from attnspec.targets import Adapter

__all__ = ["Adapter", "Config", "KINDS", "NotApplicable", "Unsupported", "UsageError", "Violation"]
