"""The outcomes a check can raise besides passing. Everything else raised inside a check is a bug
in the module under test (wrapped as a Violation by spec.case) or in attnspec itself."""


class Violation(AssertionError):
    """The module under test breaks an invariant; the message names the offending values."""


class NotApplicable(Exception):
    """The invariant cannot observe what it needs on this target (e.g. fused attention hides its
    weights, or the adapter does not say where the projections live). Never counted as a pass.
    ``structural``: true of every configuration (stop searching); false: of this example only."""

    def __init__(self, reason, structural=True):
        super().__init__(reason)
        self.structural = structural


class Unsupported(Exception):
    """The target (through its adapter) declines this configuration; the example is skipped and
    counted in the report."""


class UsageError(Exception):
    """Bad command-line or target input: unknown kind, malformed or unimportable target."""


class InternalError(Exception):
    """attnspec's own code raised during a check (a bug of attnspec, never the module's fault); the
    message names the file:line. Code of ours that runs inside the module's forward (the probe,
    forward hooks) raises this, so ``Case.guard`` does not blame the module for it."""


def internal_error(e):
    """InternalError for exception ``e`` raised by attnspec's code, naming where (innermost frame)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    error = InternalError(f"internal error in attnspec ({where}): {type(e).__name__}: {e}")
    error.__cause__ = e
    return error
