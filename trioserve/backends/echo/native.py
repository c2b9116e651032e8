"""llama.cpp's own generating endpoints, ``/completion`` and ``/infill``, shaped as
llama-server (build 11434) answers them. Pure: no I/O.

``/completion`` takes ``prompt`` (a string, or token ids of ``vocab``) and ``n_predict`` (or
``max_tokens``; -1: no limit); ``/infill`` takes ``input_prefix`` and ``input_suffix`` (both
required) and an optional ``prompt``, and its reply echoes the three. Both take ``stream``,
``return_tokens`` and the test triggers of ``generation``'s docstring.

The answer is one object with ``content``, ``stop: true``, the settings and ``timings``; a
stream sends ``data: {"content", "tokens", "stop": false, ...}`` per token and that object last
(with empty ``content``), and no ``[DONE]``. A stream that fails ends with
``data: {"error": {...}}``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from trioserve.backends.echo.options import EchoOptions
from trioserve.backends.echo.request import RequestError, parse_json
from trioserve.backends.echo.vocab import InvalidToken, detokenize, tokenize
from trioserve.backends.echo.wire import data_event, dumps, timings, words
from trioserve.backends.echo.work import Answer, TextWork

__all__ = ["NativeWork", "parse_completion", "parse_infill"]

# llama-server's defaults, reported in ``generation_settings`` as it does.
_SAMPLING: Final = {
    "seed": 4294967295,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "stop": [],
}


def _string(payload: dict[str, Any], key: str, *, required: bool) -> str:
    value = payload.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        message = f'"{key}" is required' if value is None else f'"{key}" must be a string'
        raise RequestError(400, message, f"invalid_{key}")
    return value


def _prompt(payload: dict[str, Any]) -> str:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in prompt
    ):
        try:
            return detokenize(prompt)
        except InvalidToken as error:
            raise RequestError(400, str(error), "invalid_prompt") from error
    message = '"prompt" must be a string or a list of token ids'
    raise RequestError(400, '"prompt" is required' if prompt is None else message, "invalid_prompt")


def _work(payload: dict[str, Any], options: EchoOptions, text: str, shown: str) -> NativeWork:
    key = "n_predict" if payload.get("n_predict") is not None else "max_tokens"
    limit = payload.get(key)
    return NativeWork.of(
        payload,
        options,
        text=text,
        prompt_tokens=words(shown),
        limit_key=key,
        prompt=shown,
        n_predict=limit if isinstance(limit, int) else -1,
        return_tokens=payload.get("return_tokens") is True,
    )


def parse_completion(body: bytes, options: EchoOptions) -> NativeWork:
    """A ``/completion`` request as a ``Work``; a ``RequestError`` for one llama-server
    refuses."""
    payload = parse_json(body)
    prompt = _prompt(payload)
    return _work(payload, options, prompt, prompt)


def parse_infill(body: bytes, options: EchoOptions) -> NativeWork:
    """An ``/infill`` request as a ``Work``; a ``RequestError`` for one llama-server refuses."""
    payload = parse_json(body)
    prefix = _string(payload, "input_prefix", required=True)
    suffix = _string(payload, "input_suffix", required=True)
    prompt = _string(payload, "prompt", required=False)
    shown = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{prompt}"
    return _work(payload, options, " ".join((prefix, prompt, suffix)), shown)


@dataclass(frozen=True, slots=True)
class NativeWork(TextWork):
    """A ``/completion`` or ``/infill`` request."""

    prompt: str = ""
    n_predict: int = -1
    return_tokens: bool = False

    def _final(self, content: str, tokens: list[int]) -> dict[str, Any]:
        return {
            "index": 0,
            "content": content,
            "tokens": tokens,
            "id_slot": 0,
            "stop": True,
            "model": self.model,
            "tokens_predicted": self.count,
            "tokens_evaluated": self.prompt_tokens,
            "generation_settings": {
                **_SAMPLING,
                "max_tokens": self.n_predict,
                "n_predict": self.n_predict,
                "stream": self.stream,
            },
            "prompt": "<bos>" + self.prompt,
            "has_new_line": "\n" in content,
            "truncated": False,
            "stop_type": "limit" if self.cut else "eos",
            "stopping_word": "",
            "tokens_cached": self.prompt_tokens + self.count,
            "timings": timings(self.prompt_tokens, self.count, self.token_delay),
        }

    def answer(self, number: int, created: int) -> Answer:
        if self.error_after is not None:
            return self.error_answer()
        content = "".join(self.reply())
        return Answer(
            200, dumps(self._final(content, tokenize(content) if self.return_tokens else []))
        )

    def chunks(self, number: int, created: int) -> tuple[Iterable[bytes], bytes]:
        chunks = [
            data_event(
                {
                    "index": 0,
                    "content": token,
                    "tokens": tokenize(token),
                    "stop": False,
                    "id_slot": -1,
                    "tokens_predicted": position + 1,
                    "tokens_evaluated": self.prompt_tokens,
                }
            )
            for position, token in enumerate(self.reply())
        ]
        end = data_event(self._final("", []))
        return self.failing(chunks, end, data_event({"error": self.error()}))
