"""torch, imported for attnspec: torch warns "Failed to initialize NumPy" at import when numpy is not installed
(attnspec does not need it). Exactly that warning is silenced, only while torch is first imported, so that no
`attnspec` call prints it and the user's own warning filters are left as they were. The ways into attnspec import
this module before anything that imports torch: ``attnspec.cli``, the package's public names
(``attnspec.__getattr__``), the pytest plugin once it has targets, and the workers' forkserver. The package itself
imports no torch, so that the pytest plugin, loaded in every pytest run where attnspec is installed, costs nothing
(about 1.5 s of torch import) in a run without targets."""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401
