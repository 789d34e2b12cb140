"""Errors shared by the CLI, the server and the loaders."""


class UsageError(Exception):
    """A mistake by the user (bad value, bad file, missing model): reported as one line."""
