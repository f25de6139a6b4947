"""Errors a user can fix. The CLI prints the message (no traceback), so each one says how to fix it."""

from __future__ import annotations


class TuningError(Exception):
    """Base class of every tuning error the user can act on."""


class DataError(TuningError):
    """Training data is missing or invalid; the message names file, row and field."""


class ModelError(TuningError):
    """A base model cannot be found or loaded."""


class AdapterError(TuningError):
    """An adapter is missing, incomplete or already exists."""


class RaftError(TuningError):
    """RAFT examples cannot be built (unknown collection, question without source, ...)."""
