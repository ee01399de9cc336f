"""pytest configuration of attnspec's own repository. The attnspec plugin itself is loaded by its
``pytest11`` entry point (installed with the package), as in any repository that installs attnspec."""
