"""pytest configuration of attnspec's own repository. The attnspec plugin itself is loaded by its
``pytest11`` entry point (installed with the package), as in any repository that installs attnspec;
the bundled modules are its targets through ``attnspec_targets`` in pyproject.toml.

The repository's own tests (planted bugs, adapters, ...) call the runner without an explicit profile:
they run under attnspec's profile, loaded here for this repository only (attnspec-ci when $CI is set,
else attnspec-dev), with one torch thread (the tensors are tiny; parallelism comes from xdist).
Tests marked ``slow`` run first: one left for the end keeps one worker busy while the other waits."""

import pytest
import torch
from hypothesis import settings

from attnspec import profiles

settings.load_profile(profiles.default_profile())
torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The slow tests first, the rest in collection order (a stable sort: every xdist worker gets the same order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
