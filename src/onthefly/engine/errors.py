"""Errors the engine raises for a run that cannot go on; the command line prints their message as one line."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to change."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be resumed from; the message names the file."""
