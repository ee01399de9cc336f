"""attnspec: an executable specification of attention, checked with Hypothesis."""

from spec.errors import NotApplicable, Unsupported, UsageError, Violation
from spec.kinds import KINDS, Config
from spec.targets import Adapter

__all__ = ["Adapter", "Config", "KINDS", "NotApplicable", "Unsupported", "UsageError", "Violation"]
