"""Importing this file raises: the user's module is broken before any class exists."""

raise RuntimeError("broken at import time (bad_targets/raises_on_import.py)")


class MHA:  # never reached
    pass
