"""Errors a user can act on. Every entry point turns library exceptions into one of these, with what to fix."""

from __future__ import annotations


class SessionrecError(Exception):
    """Base class: the message is meant for a person and says what to do."""


class DatasetError(SessionrecError):
    """A whole source or batch is unusable: missing column, empty file, schema change, too many duplicates.

    ``code`` is stable (for metadata and tests); the message says what is wrong and how to fix it.
    """

    def __init__(self, code: str, message: str, source: str | None = None) -> None:
        self.code = code
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}{message}")
