"""Pieces of error messages shared by the modules that quote an error they caught."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """``"TypeName: first line of the message"``: an error quoted inside another message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
