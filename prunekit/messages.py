"""Messages on one line: what errors and warnings say, however the text they carry was wrapped.

Example:
    >>> one_line(ValueError("a\\n   wrapped   message"))
    'a wrapped message'
    >>> one_line(KeyError("features.3"))
    'features.3'
"""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(message: object) -> str:
    """An error's message (or any text) on one line; a KeyError's without its quotes; an empty error's class name."""
    if isinstance(message, BaseException):
        text = message.args[0] if isinstance(message, KeyError) and message.args else str(message)
        return " ".join(str(text).split()) or type(message).__name__
    return " ".join(str(message).split())
