from attnspec.cli import console

console()
