"""Imported by the workers' forkserver (spec/supervisor.py ``_context``): warms it once, so every worker
it forks starts warm (``runner.warm_up``)."""

from attnspec.runner import warm_up

warm_up()
