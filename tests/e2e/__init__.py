"""The CLI as a subprocess."""
