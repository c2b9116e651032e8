"""What the model says, whatever the API asks it: pure functions, the same in every process."""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["embed", "reply_tokens", "usage"]

# The word a reply is made of when there is nothing to echo.
_EMPTY_INPUT_WORD: Final = "echo"

# Embedding vectors are this long: enough to tell inputs apart, small enough to be cheap.
_EMBEDDING_SIZE: Final = 8


def reply_tokens(text: str, count: int, start: int = 0) -> list[str]:
    """The reply to ``text``: its words from word ``start`` on, cycled to ``count`` tokens, each
    but the last with a space.

    >>> reply_tokens("hello world", 3)
    ['hello ', 'world ', 'hello']
    """
    words = text.split() or [_EMPTY_INPUT_WORD]
    last = count - 1
    return [words[(i + start) % len(words)] + (" " if i < last else "") for i in range(count)]


def embed(text: str) -> list[float]:
    """A deterministic vector in [-1, 1] for ``text``, the same in every process.

    Python's ``hash`` is salted per process, so the vector comes from a blake2b digest.
    """
    digest = hashlib.blake2b(text.encode(), digest_size=2 * _EMBEDDING_SIZE).digest()
    return [
        round(int.from_bytes(digest[i : i + 2], "big") / 32767.5 - 1.0, 6)
        for i in range(0, len(digest), 2)
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
