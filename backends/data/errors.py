"""The one error type of data binding."""

from __future__ import annotations


class DataError(ValueError):
    """Client data that cannot be opened or does not fit the declared type.

    The message says what is wrong (the source, and where it applies the client
    id and the field) and how to fix it; the CLI prints it as is."""
