"""The assembler in tests: fed reads as they came, and its answer as the OpenAI SDK models a
completion, for comparing with the SDK's own accumulation of the same stream; the anthropic
SDK's accumulation of a Messages stream."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import httpx2  # the anthropic SDK's own copy of httpx
from anthropic.types import Message
from openai.types.chat import ChatCompletion

from trioserve.gateway.assemble import Assembled, Assembler, Kind


def assemble(kind: Kind, reads: list[bytes], response: httpx.Response | None = None) -> Assembled:
    """The assembly of ``reads``, fed one at a time; the head is ``response``'s when given
    (else a 200 event stream)."""
    if response is None:
        assembler = Assembler(kind)
    else:
        assembler = Assembler(kind, response.status_code, response.headers["content-type"])
    for read in reads:
        assembler.feed(read)
    return assembler.result()


def comparable(completion: ChatCompletion) -> dict[str, Any]:
    """A completion as the SDK's model of it, without what only the SDK's streaming adds."""
    dumped = completion.model_dump(mode="json")
    for choice in dumped["choices"]:
        message = choice["message"]
        message.pop("parsed", None)
        for call in message.get("tool_calls") or ():
            call.pop("index", None)  # of the stream's deltas
            call["function"].pop("parsed_arguments", None)
    return dumped


def as_sdk_sees(answer: Assembled) -> dict[str, Any]:
    """A successful assembled answer, parsed by the SDK and made ``comparable``."""
    assert answer.status == 200 and answer.content_type == b"application/json"
    return comparable(ChatCompletion.model_validate_json(answer.body))


def anthropic_final_message(stream: bytes) -> Message:
    """The anthropic SDK's ``messages.stream(...).get_final_message()`` of ``stream``."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=stream)

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = anthropic.Anthropic(api_key="k", base_url="http://model", http_client=http)
    with client.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as events:
        return events.get_final_message()
