"""``/v1/embeddings``: the request parsed and the answer built. Pure: no I/O."""

from __future__ import annotations

import json
from typing import Any

from trioserve.backends.echo.model import embed
from trioserve.backends.echo.request import RequestError, parse_json

__all__ = ["embeddings_answer"]


def embeddings_answer(body: bytes, model: str) -> bytes:
    """The JSON answer to the request ``body``, one vector per input; or a ``RequestError``."""
    payload = parse_json(body)
    texts = payload.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise RequestError(400, "'input' must be a string or a list of strings.", "invalid_input")
    words = sum(len(text.split()) for text in texts)
    answer: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": embed(text)}
            for index, text in enumerate(texts)
        ],
        "model": model,
        "usage": {"prompt_tokens": words, "total_tokens": words},
    }
    return json.dumps(answer, separators=(",", ":")).encode()
