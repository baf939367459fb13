"""The one base of every error a user can act on.

Each error class of the package derives from :class:`DetDistillError` and from
the built-in exception it has always been (``ValueError``, ``RuntimeError``,
...), so ``except DetDistillError`` catches everything detdistill reports about
bad input or state, and existing ``except ValueError`` code keeps working. The
command line prints these as one line (``detdistill <command>: error: ...``);
``--debug`` shows the traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DetDistillError", "UnknownNameError"]


class DetDistillError(Exception):
    """Bad input or state that the user can fix; the message says what and where."""


class UnknownNameError(DetDistillError, ValueError):
    """A name (detector, method, backbone, ...) that no registry knows; the message lists the known."""


class ConfigError(DetDistillError, ValueError):
    """A configuration problem; the message names the dotted key (one line)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class CheckpointError(DetDistillError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""
