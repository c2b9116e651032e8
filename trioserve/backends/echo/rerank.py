"""``/v1/rerank`` (also ``/v1/reranking``, ``/rerank``), shaped as llama-server answers it.
Pure: no I/O.

The request: ``query``, ``documents`` (strings, or ``{"text"}`` objects), ``top_n``; or TEI's
``texts`` (and ``return_text``), answered in TEI's shape, a bare list with ``score``. A document's
score is the share of the query's words it contains (case aside), so a test knows the order:
highest first, ties in the documents' order. Usage counts the words of the query and the
document, for each document, as the model reads each pair.
"""

from __future__ import annotations

from typing import Any

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.request import RequestError, optional_int, parse_json
from trioserve.backends.echo.wire import dumps, words

__all__ = ["rerank_answer", "score"]


def score(query: str, document: str) -> float:
    """The share of ``query``'s distinct words that ``document`` contains."""
    asked = set(query.lower().split())
    if not asked:
        return 0.0
    return len(asked & set(document.lower().split())) / len(asked)


def _documents(payload: dict[str, Any], key: str) -> list[str]:
    documents = payload.get(key)
    if isinstance(documents, list) and documents:
        texts = [d.get("text") if isinstance(d, dict) else d for d in documents]
        if all(isinstance(text, str) for text in texts):
            return [text for text in texts if isinstance(text, str)]
    message = f'"{key}" must be a non-empty array of strings'
    raise RequestError(400, message, f"invalid_{key}")


def rerank_answer(body: bytes, options: EchoOptions) -> bytes:
    """The answer to the request ``body``; a ``RequestError`` for one llama-server refuses."""
    payload = parse_json(body)
    query = payload.get("query")
    if not isinstance(query, str):
        raise RequestError(400, '"query" must be provided', "invalid_query")
    tei = "texts" in payload and "documents" not in payload
    documents = _documents(payload, "texts" if tei else "documents")
    top_n = optional_int(payload, "top_n", 0, 1 << 30)
    label = "score" if tei else "relevance_score"
    results: list[dict[str, Any]] = [
        {"index": index, label: score(query, document)} for index, document in enumerate(documents)
    ]
    if tei and payload.get("return_text") is True:
        for result in results:
            result["text"] = documents[result["index"]]
    results.sort(key=lambda result: -result[label])  # stable: ties keep the documents' order
    results = results[: len(results) if top_n is None else top_n]
    if tei:
        return dumps(results)
    tokens = sum(words(query, document) for document in documents)
    model = payload.get("model")
    return dumps(
        {
            "model": model if isinstance(model, str) else options.model_name,
            "object": "list",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }
    )
