"""pytest configuration: the attnspec plugin (--impl, Hypothesis profiles) and the repo on sys.path."""

pytest_plugins = ["spec.plugin"]
