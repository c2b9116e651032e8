"""llama.cpp's light text endpoints, answered at once: ``/tokenize``, ``/detokenize`` and
``/apply-template``, shaped as llama-server answers them. Pure: no I/O.

- ``/tokenize``: ``{"content", "add_special"?, "with_pieces"?}`` → ``{"tokens": [ids]}``, or
  ``[{"id", "piece"}]`` with pieces (``vocab`` is the tokenizer).
- ``/detokenize``: ``{"tokens": [ids]}`` → ``{"content"}``.
- ``/apply-template``: ``{"messages"}`` → ``{"prompt"}``, ChatML as ``CHAT_TEMPLATE`` says.
"""

from __future__ import annotations

from typing import Any, Final

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.request import RequestError, parse_json
from trioserve.backends.echo.vocab import InvalidToken, detokenize, piece, tokenize
from trioserve.backends.echo.wire import content_text, dumps

__all__ = ["CHAT_TEMPLATE", "apply_template_answer", "detokenize_answer", "tokenize_answer"]

# The Jinja template /props reports, as llama-server reports the model's; what
# ``apply_template_answer`` does.
CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)


def tokenize_answer(body: bytes, options: EchoOptions) -> bytes:
    """``/tokenize``."""
    payload = parse_json(body)
    content = payload.get("content")
    if not isinstance(content, str):
        raise RequestError(400, '"content" must be a string', "invalid_content")
    tokens = tokenize(content, add_bos=payload.get("add_special") is True)
    if payload.get("with_pieces") is True:
        return dumps({"tokens": [{"id": token, "piece": piece(token)} for token in tokens]})
    return dumps({"tokens": tokens})


def detokenize_answer(body: bytes, options: EchoOptions) -> bytes:
    """``/detokenize``."""
    tokens = parse_json(body).get("tokens")
    if not isinstance(tokens, list) or not all(
        isinstance(token, int) and not isinstance(token, bool) for token in tokens
    ):
        raise RequestError(400, '"tokens" must be a list of token ids', "invalid_tokens")
    try:
        return dumps({"content": detokenize(tokens)})
    except InvalidToken as error:
        raise RequestError(400, str(error), "invalid_tokens") from error


def apply_template_answer(body: bytes, options: EchoOptions) -> bytes:
    """``/apply-template``: the prompt the model would read, its reply's start included."""
    messages = parse_json(body).get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(message, dict) and isinstance(message.get("role"), str) for message in messages
    ):
        raise RequestError(
            400, '"messages" must be a list of {"role", "content"}', "invalid_messages"
        )
    prompt = "".join(_turn(message) for message in messages) + "<|im_start|>assistant\n"
    return dumps({"prompt": prompt})


def _turn(message: dict[str, Any]) -> str:
    return f"<|im_start|>{message['role']}\n{content_text(message.get('content'))}<|im_end|>\n"
