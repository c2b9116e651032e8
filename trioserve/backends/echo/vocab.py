"""The echo model's tokenizer, for ``/tokenize``, ``/detokenize`` and the token ids of
llama.cpp's ``/completion`` stream. Pure, stateless and the same in every process.

A token is a piece of at most three bytes of UTF-8: each word with the spaces before it, cut in
pieces at character boundaries where it can be (``"Say hi"`` is ``"Say"``, ``" hi"``). Its id
holds its bytes (``length << 24 | bytes``), so ``detokenize(tokenize(text)) == text`` for any
text, with no vocabulary to keep; ids below 2**24 are the special tokens, Gemma's first three.

Usage counts (``prompt_tokens`` and the like) stay words, as everywhere in the echo; like a real
server's, they need not match the tokenizer's count.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["BOS", "InvalidToken", "detokenize", "piece", "tokenize"]

BOS: Final = 2
_SPECIAL: Final = {0: "<pad>", 1: "<eos>", BOS: "<bos>"}
_PIECE_BYTES: Final = 3  # with a length field of 2 bits, the id stays below 2**26: an int32
_SHIFT: Final = 24
_WORDS: Final = re.compile(r"\s*\S+|\s+")


class InvalidToken(ValueError):
    """A token id the vocabulary does not have."""


def _pieces(text: str) -> list[bytes]:
    pieces: list[bytes] = []
    for word in _WORDS.findall(text):
        current = b""
        for char in word:
            # surrogatepass: a lone surrogate (valid in JSON strings) still round-trips.
            encoded = char.encode("utf-8", "surrogatepass")
            if len(current) + len(encoded) > _PIECE_BYTES:
                if current:
                    pieces.append(current)
                current = b""
                while len(encoded) > _PIECE_BYTES:  # a 4-byte character: split as bytes
                    pieces.append(encoded[:_PIECE_BYTES])
                    encoded = encoded[_PIECE_BYTES:]
            current += encoded
        if current:
            pieces.append(current)
    return pieces


def tokenize(text: str, *, add_bos: bool = False) -> list[int]:
    """The token ids of ``text``; ``add_bos``: after a beginning-of-sequence token."""
    ids = [len(p) << _SHIFT | int.from_bytes(p, "big") for p in _pieces(text)]
    return [BOS, *ids] if add_bos else ids


def _bytes(token: int) -> bytes:
    if token in _SPECIAL:
        return _SPECIAL[token].encode()
    length = token >> _SHIFT
    if not 1 <= length <= _PIECE_BYTES:
        raise InvalidToken(f"token id {token} is not in the vocabulary")
    return (token & ((1 << _SHIFT) - 1)).to_bytes(length, "big")


def piece(token: int) -> str | list[int]:
    """A token's text, or its bytes when they are not whole UTF-8 characters (as
    llama-server's ``with_pieces`` answers them)."""
    data = _bytes(token)
    try:
        return data.decode()
    except UnicodeDecodeError:
        return list(data)


def detokenize(tokens: list[int]) -> str:
    """The text of ``tokens``; bytes that are no UTF-8 become U+FFFD."""
    return b"".join(_bytes(token) for token in tokens).decode("utf-8", "replace")
