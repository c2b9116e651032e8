"""The assembler for the Responses API (``/v1/responses``) and Anthropic's Messages
(``/v1/messages``): llama-server's own streams and non-streaming answers (build 11434, in
tests/data/llama-server-b11434/: the same request both ways), hand-built streams in the
APIs' own shapes, SSE framing split anywhere, error events, streams cut short, and the
request sent upstream (``trioserve.gateway.assemble``, no I/O).

The oracles: llama-server's non-streaming answer to the same request, and for Messages the
``anthropic`` SDK's own accumulation (``messages.stream(...).get_final_message()``) of the
very bytes, fed through its HTTP client's mock transport.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.assembly import anthropic_final_message
from trioserve.gateway.assemble import (
    ASSEMBLED_PATHS,
    Assembled,
    Assembler,
    BrokenStream,
    Kind,
    upstream_body,
)

DATA = Path(__file__).parent / "data" / "llama-server-b11434"
NOW = 1796612700.75  # the assembler's clock, for a response's completed_at


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def assemble(kind: Kind, reads: list[bytes]) -> Assembled:
    assembler = Assembler(kind, clock=lambda: NOW)
    for read in reads:
        assembler.feed(read)
    return assembler.result()


def answer_of(kind: Kind, stream: bytes) -> dict[str, Any]:
    answer = assemble(kind, [stream])
    assert (answer.status, answer.content_type) == (200, b"application/json"), answer.body
    parsed: dict[str, Any] = json.loads(answer.body)
    return parsed


def sse(*events: dict[str, Any]) -> bytes:
    """Events as llama-server and the APIs frame them: ``event:`` the type, ``data:`` the JSON."""
    return b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
        for event in events
    )


def sdk_final_message(stream: bytes) -> dict[str, Any]:
    """The anthropic SDK's ``get_final_message()`` of ``stream``, as the SDK models it."""
    return as_sdk_sees(anthropic_final_message(stream))


def as_sdk_sees(message: Message) -> dict[str, Any]:
    dumped = message.model_dump(mode="json")
    for block in dumped["content"]:
        block.pop("parsed_output", None)  # the SDK's own, for structured outputs
    return dumped


# -- llama-server's own answers ---------------------------------------------------------------


def test_responses_stream_is_llama_servers_non_streaming_answer() -> None:
    stream = sample("responses.sse")
    got = answer_of("responses", stream)
    expected = json.loads(sample("responses.json"))
    # Each generation has its own ids and second.
    for answer in (got, expected):
        assert answer.pop("id").startswith("resp_")
        assert answer["output"][0].pop("id").startswith("msg_")
        assert answer.pop("created_at") <= answer.pop("completed_at")
    assert got == expected
    assert got["output"][0]["content"][0]["text"] == "Écris une phrase en français sur le café.<|im"
    assert got["usage"] == {
        "input_tokens": 33,
        "output_tokens": 12,
        "total_tokens": 45,
        "input_tokens_details": {"cached_tokens": 28},
    }


def test_a_response_gets_completed_at_and_not_the_streams_timings() -> None:
    stream = sample("responses.sse")
    assert b'"timings"' in stream and b'"completed_at"' not in stream
    got = answer_of("responses", stream)
    # The clock when the stream completed, next to created_at; timings sit beside the
    # response in its event, and llama-server's non-streaming answer has none.
    assert got["completed_at"] == int(NOW)
    assert list(got)[:5] == ["id", "object", "created_at", "completed_at", "status"]
    assert "timings" not in got and "timings" not in json.loads(sample("responses.json"))


@pytest.mark.parametrize("name", ["messages", "messages-stop"])
def test_messages_stream_is_llama_servers_non_streaming_answer(name: str) -> None:
    stream = sample(f"{name}.sse")
    got = answer_of("messages", stream)
    expected = json.loads(sample(f"{name}.json"))
    assert got.pop("id") != expected.pop("id")
    assert got == expected
    # In the same order, to the usage's keys.
    assert list(got) == list(expected)
    assert list(got["usage"]) == list(expected["usage"])


def test_messages_stop_sequence_and_usage() -> None:
    got = answer_of("messages", sample("messages-stop.sse"))
    assert (got["stop_reason"], got["stop_sequence"]) == ("end_turn", "sur")
    assert got["content"] == [{"type": "text", "text": "Écris une phrase en français "}]
    assert got["usage"] == {"cache_read_input_tokens": 28, "input_tokens": 5, "output_tokens": 7}


@pytest.mark.parametrize("name", ["messages.sse", "messages-stop.sse"])
def test_messages_stream_is_what_the_anthropic_sdk_accumulates(name: str) -> None:
    stream = sample(name)
    answer = assemble("messages", [stream])
    assert as_sdk_sees(Message.model_validate_json(answer.body)) == sdk_final_message(stream)


# -- SSE framing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name"),
    [("responses", "responses.sse"), ("messages", "messages.sse")],
)
def test_a_split_at_every_byte_boundary_changes_nothing(kind: Kind, name: str) -> None:
    stream = sample(name)
    assert "é".encode() in stream  # 2-byte characters that reads may split
    whole = assemble(kind, [stream])
    for cut in range(len(stream) + 1):
        assert assemble(kind, [stream[:cut], stream[cut:]]) == whole, cut


def reframed(stream: bytes, newline: bytes) -> bytes:
    """The same events with other line ends, a comment line and an id field in each."""
    events = [event for event in stream.split(b"\n\n") if event]
    extra = b": keep-alive" + newline + b"id: 7" + newline
    return b"".join(extra + e.replace(b"\n", newline) + newline * 2 for e in events)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    kind=st.sampled_from(["responses", "messages"]),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_any_split_of_any_framing_changes_nothing(
    data: st.DataObject, kind: Kind, newline: bytes
) -> None:
    original = sample(f"{kind}.sse")
    stream = reframed(original, newline)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert assemble(kind, reads) == assemble(kind, [original])


# -- Messages in Anthropic's own shape ---------------------------------------------------------

ANTHROPIC_START = {
    "type": "message_start",
    "message": {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-x",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 472,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 100,
            "output_tokens": 2,
        },
    },
}
CITATION = {
    "type": "char_location",
    "cited_text": "sunny",
    "document_index": 0,
    "document_title": "forecast",
    "start_char_index": 0,
    "end_char_index": 5,
}


def delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": fields}


ANTHROPIC_TOOL_STREAM = sse(
    ANTHROPIC_START,
    {"type": "ping"},
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    delta(0, type="thinking_delta", thinking="The user wants "),
    delta(0, type="thinking_delta", thinking="the weather."),
    delta(0, type="signature_delta", signature="EqQBCkgIARABGAIiQL"),
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    delta(1, type="text_delta", text="It is "),
    delta(1, type="citations_delta", citation=CITATION),
    delta(1, type="text_delta", text="sunny; checking €."),
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {}},
    },
    delta(2, type="input_json_delta", partial_json=""),
    delta(2, type="input_json_delta", partial_json='{"location": "San Fra'),
    delta(2, type="input_json_delta", partial_json='ncisco", "days": [1, '),
    delta(2, type="input_json_delta", partial_json="2]}"),
    {"type": "content_block_stop", "index": 2},
    {
        "type": "content_block_start",
        "index": 3,
        "content_block": {"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}},
    },
    {"type": "content_block_stop", "index": 3},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        # Cumulative: input_tokens replaces message_start's, a null is not a count.
        "usage": {"input_tokens": 480, "cache_read_input_tokens": None, "output_tokens": 89},
    },
    {"type": "message_stop"},
)


def test_thinking_text_citations_and_tool_calls_equal_the_sdks() -> None:
    answer = assemble("messages", [ANTHROPIC_TOOL_STREAM])
    got = json.loads(answer.body)
    assert got["content"] == [
        {"type": "thinking", "thinking": "The user wants the weather.",
         "signature": "EqQBCkgIARABGAIiQL"},
        {"type": "text", "text": "It is sunny; checking €.", "citations": [CITATION]},
        {"type": "tool_use", "id": "toolu_01", "name": "weather",
         "input": {"location": "San Francisco", "days": [1, 2]}},
        {"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}},
    ]  # fmt: skip
    assert got["stop_reason"] == "tool_use"
    assert got["usage"] == {
        "input_tokens": 480,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 100,
        "output_tokens": 89,
    }
    assert as_sdk_sees(Message.model_validate_json(answer.body)) == sdk_final_message(
        ANTHROPIC_TOOL_STREAM
    )


# A tool call and reasoning as llama-server streams them (server-task.cpp,
# to_json_anthropic*): the tool_use block starts without "input", the thinking block gets an
# empty signature; its non-streaming answer has the same blocks with "input" last.
LLAMA_TOOL_STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "id": "chatcmpl-abc", "type": "message", "role": "assistant", "content": [],
            "model": "gemma", "stop_reason": None, "stop_sequence": None,
            "usage": {"cache_read_input_tokens": 0, "input_tokens": 30, "output_tokens": 0},
        },
    },
    {"type": "content_block_start", "index": 0,
     "content_block": {"type": "thinking", "thinking": ""}},
    delta(0, type="thinking_delta", thinking="Paris"),
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    delta(1, type="text_delta", text="Let me look."),
    {"type": "content_block_start", "index": 2,
     "content_block": {"type": "tool_use", "id": "call_1", "name": "weather"}},
    delta(2, type="input_json_delta", partial_json='{"city":'),
    delta(2, type="input_json_delta", partial_json='"Paris"}'),
    delta(0, type="signature_delta", signature=""),
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_stop", "index": 1},
    {"type": "content_block_stop", "index": 2},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
     "usage": {"output_tokens": 9}},
    {"type": "message_stop"},
)  # fmt: skip


def test_llama_servers_tool_call_and_reasoning_are_its_non_streaming_blocks() -> None:
    answer = assemble("messages", [LLAMA_TOOL_STREAM])
    got = json.loads(answer.body)
    assert got == {
        "id": "chatcmpl-abc", "type": "message", "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Paris", "signature": ""},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
        ],
        "model": "gemma", "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"cache_read_input_tokens": 0, "input_tokens": 30, "output_tokens": 9},
    }  # fmt: skip
    assert list(got["content"][2]) == ["type", "id", "name", "input"]
    assert as_sdk_sees(Message.model_validate_json(answer.body)) == sdk_final_message(
        LLAMA_TOOL_STREAM
    )


def test_tool_input_that_is_not_json_is_an_empty_object_as_llama_server_answers() -> None:
    stream = LLAMA_TOOL_STREAM.replace(b'"partial_json":"\\"Paris\\"}"', b'"partial_json":"Par"')
    assert stream != LLAMA_TOOL_STREAM
    content = answer_of("messages", stream)["content"]
    assert content[2] == {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}}


REFUSAL = {"type": "refusal", "category": "cyber", "explanation": "no"}


def test_unknown_events_and_deltas_are_left_out() -> None:
    stream = sse(
        ANTHROPIC_START,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        delta(0, type="text_delta", text="a"),
        delta(0, type="future_delta", text="not text"),
        {"type": "future_event", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                                            "container": None,
                                            "stop_details": REFUSAL},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    )  # fmt: skip
    got = answer_of("messages", stream)
    assert got["content"] == [{"type": "text", "text": "a"}]
    # Set as the SDK sets them: a null container is not.
    assert got["stop_details"] == REFUSAL and "container" not in got
    assert as_sdk_sees(Message.model_validate_json(json.dumps(got))) == sdk_final_message(stream)


# -- Responses in OpenAI's own shape -----------------------------------------------------------


def response(status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1700000000,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "model": "gpt-x",
        "output": [],
        "usage": None,
        **fields,
    }


OUTPUT = [
    {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hi there", "annotations": []}],
    }
]
USAGE = {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}


def openai_stream(*end: dict[str, Any]) -> bytes:
    """OpenAI's Responses stream: sequence numbers, indexes, a response in every framing
    event; ``end`` after two deltas."""
    events = [
        {"type": "response.created", "response": response("in_progress")},
        {"type": "response.in_progress", "response": response("in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**OUTPUT[0], "status": "in_progress", "content": []}},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "Hi"},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": " there"},
        *end,
    ]  # fmt: skip
    return sse(*({**event, "sequence_number": n} for n, event in enumerate(events)))


def test_openais_completed_response_is_the_answer_with_its_own_completed_at() -> None:
    completed = response("completed", completed_at=1700000003, output=OUTPUT, usage=USAGE)
    stream = openai_stream({"type": "response.completed", "response": completed})
    assert answer_of("responses", stream) == completed


def test_an_incomplete_response_is_a_200_answer_without_completed_at() -> None:
    incomplete = response(
        "incomplete",
        incomplete_details={"reason": "max_output_tokens"},
        output=OUTPUT,
        usage=USAGE,
    )
    stream = openai_stream({"type": "response.incomplete", "response": incomplete})
    assert answer_of("responses", stream) == incomplete


# -- errors -----------------------------------------------------------------------------------


def error_answer(kind: Kind, stream: bytes) -> tuple[int, Any]:
    answer = assemble(kind, [stream])
    assert answer.content_type == b"application/json"
    return answer.status, json.loads(answer.body)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("rate_limit_exceeded", 429, "rate_limit_exceeded"),
        ("server_error", 500, "server_error"),
        ("vector_store_timeout", 504, "vector_store_timeout"),
        ("invalid_prompt", 400, "invalid_prompt"),
        ("image_too_large", 400, "image_too_large"),
        (None, 500, "server_error"),
    ],
)
def test_a_failed_response_is_the_error_answer_its_code_names(
    code: str | None, status: int, kind: str
) -> None:
    failed = response("failed", error={"code": code, "message": "it failed"}, usage=USAGE)
    stream = openai_stream({"type": "response.failed", "response": failed})
    assert error_answer("responses", stream) == (
        status,
        {"error": {"code": status, "message": "it failed", "type": kind}},
    )
    assembler = Assembler("responses")
    assembler.feed(stream)
    assert assembler.done and assembler.tokens() == (9, 2)  # the tokens it spent count


def test_openais_error_event_is_the_error_answer() -> None:
    event = {"type": "error", "code": "rate_limit_exceeded", "message": "slow", "param": None}
    stream = openai_stream(event)
    assert error_answer("responses", stream) == (
        429,
        {"error": {"code": 429, "message": "slow", "type": "rate_limit_exceeded"}},
    )


def test_llama_servers_error_in_a_responses_stream_is_its_non_streaming_error() -> None:
    # llama-server writes a Responses stream's error as a chat stream's: a data line only.
    error = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
    stream = sample("responses.sse").split(b"event: response.output_text.done")[0]
    answer = assemble("responses", [stream + b"data: " + error + b"\n\n", b"data: [1]\n\n"])
    assert (answer.status, answer.body) == (503, error)


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("invalid_request_error", 400),
        ("authentication_error", 401),
        ("billing_error", 402),
        ("permission_error", 403),
        ("not_found_error", 404),
        ("request_too_large", 413),
        ("rate_limit_error", 429),
        ("api_error", 500),
        ("timeout_error", 504),
        ("overloaded_error", 529),
        ("an_error_of_tomorrow", 500),
    ],
)
def test_anthropics_error_event_is_its_error_body_with_its_status(kind: str, status: int) -> None:
    data = {"type": "error", "error": {"type": kind, "message": "Overloaded"}, "request_id": "r"}
    stream = sample("messages.sse").split(b"event: content_block_stop")[0] + sse(data)
    answer = assemble("messages", [stream, b"event: message_stop\ndata: not JSON\n\n"])
    assert (answer.status, json.loads(answer.body)) == (status, data)


def test_llama_servers_error_event_in_a_messages_stream_is_its_non_streaming_error() -> None:
    # server-context.cpp: `event: error` and the bare error object, which its non-streaming
    # answer wraps in {"error": ...}.
    error = {"code": 500, "message": "slot crashed", "type": "server_error"}
    stream = sample("messages.sse").split(b"event: content_block_stop")[0]
    stream += b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
    assert error_answer("messages", stream) == (500, {"error": error})


def test_an_error_before_the_stream_is_passed_through_unchanged() -> None:
    body = (
        b'{"error":{"code":400,"message":"request (3024 tokens) exceeds the available context'
        b' size (1024 tokens), try increasing it","type":"exceed_context_size_error",'
        b'"n_prompt_tokens":3024,"n_ctx":1024}}'
    )
    for kind in ("responses", "messages"):
        assembler = Assembler(kind, 400, "application/json; charset=utf-8")
        assembler.feed(body[:50])
        assembler.feed(body[50:])
        assert assembler.result() == Assembled(400, b"application/json; charset=utf-8", body)


@pytest.mark.parametrize(
    ("kind", "name", "end"),
    [
        ("responses", "responses.sse", "'event: response.completed'"),
        ("messages", "messages.sse", "'event: message_stop'"),
    ],
)
def test_a_stream_cut_before_its_end_is_broken(kind: Kind, name: str, end: str) -> None:
    stream = sample(name)
    last = stream.rindex(b"event: ")
    assembler = Assembler(kind)
    assembler.feed(stream[:last] + b"data: [DONE]\n\n")  # a proxy's [DONE] is not the end
    assert not assembler.done
    with pytest.raises(BrokenStream, match=f"ended before {end}"):
        assembler.result()


@pytest.mark.parametrize(
    ("kind", "stream"),
    [
        ("messages", sse({"type": "content_block_start", "index": 0,
                          "content_block": {"type": "text", "text": ""}})),
        ("messages", sse(ANTHROPIC_START, delta(0, type="text_delta", text="no block 0"))),
        ("messages", sse(ANTHROPIC_START, {"type": "content_block_start", "index": "0",
                                           "content_block": {"type": "text"}})),
        ("messages", sse({"type": "message_delta", "delta": {}}, {"type": "message_stop"})),
        ("messages", sse({"type": "message_stop"})),
        ("messages", sse({"type": "message_start", "message": ["not", "a", "message"]})),
        ("messages", sse(ANTHROPIC_START, {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}},
                         delta(0, type="text_delta", text=7))),
        ("responses", sse({"type": "response.completed", "response": "done"})),
        ("responses", sse({"type": "response.completed"})),
        ("responses", b"event: response.created\ndata: {not json}\n\n"),
        ("responses", b"data: [1, 2]\n\n"),
    ],
    ids=["block-first", "delta-unknown-block", "index-str", "delta-first", "stop-first",
         "message-list", "text-number", "response-str", "response-missing", "not-json",
         "not-object"],
)  # fmt: skip
def test_events_out_of_the_apis_shape_are_a_broken_stream(kind: Kind, stream: bytes) -> None:
    assembler = Assembler(kind)
    with pytest.raises(BrokenStream):
        assembler.feed(stream)
        assembler.result()


# -- usage ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "usage"),
    [("responses", "responses.sse", (33, 12)), ("messages", "messages.sse", (33, 12))],
)
def test_the_usage_of_a_whole_stream(kind: Kind, name: str, usage: tuple[int, int]) -> None:
    assembler = Assembler(kind)
    assembler.feed(sample(name))
    assert assembler.done
    # A message's prompt is its input tokens and those read from the cache (5 + 28).
    assert assembler.tokens() == assembler.counted() == usage


@pytest.mark.parametrize(
    ("kind", "name", "marker", "prompt"),
    [
        ("responses", "responses.sse", b"event: response.output_text.delta", 0),
        ("messages", "messages.sse", b"event: content_block_delta", 33),
    ],
)
def test_an_answer_cut_short_counts_its_token_events(
    kind: Kind, name: str, marker: bytes, prompt: int
) -> None:
    stream = sample(name)
    deltas = [at for at in range(len(stream)) if stream.startswith(marker, at)]
    assert len(deltas) == 12
    for seen in (0, 1, 5, 12):
        # Cut inside the next event: the framing events before are no tokens.
        cut = deltas[seen] + 10 if seen < 12 else stream.index(b"\n\n", deltas[-1]) + 2
        assembler = Assembler(kind)
        assembler.feed(stream[:cut])
        assert not assembler.done and assembler.tokens() is None
        expected = (prompt, seen) if seen or prompt else None
        assert assembler.counted() == expected, seen


def test_a_message_without_its_message_delta_has_no_usage_yet() -> None:
    stream = sample("messages.sse")
    assembler = Assembler("messages")
    assembler.feed(stream[: stream.index(b"event: message_delta")])
    assert assembler.usage is None and assembler.tokens() is None
    assembler.feed(stream[stream.index(b"event: message_delta") :])
    assert assembler.usage == {
        "cache_read_input_tokens": 28,
        "input_tokens": 5,
        "output_tokens": 12,
    }


def test_chat_cut_short_still_counts_every_event() -> None:
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"w"}}]}\n\n'
    assembler = Assembler("chat")
    assembler.feed(chunk * 3)
    assert assembler.tokens() is None and assembler.counted() == (0, 3)
    assembler.feed(b"data: [DONE]\n\n")
    assert assembler.counted() is None  # whole, without usage: none


# -- the request sent upstream ----------------------------------------------------------------


def test_the_new_apis_are_assembled_paths() -> None:
    assert ASSEMBLED_PATHS["/v1/responses"] == "responses"
    assert ASSEMBLED_PATHS["/v1/messages"] == "messages"


@pytest.mark.parametrize("kind", ["responses", "messages"])
@pytest.mark.parametrize("tail", [b"", b" \r\n"])
def test_upstream_body_adds_only_stream_true(kind: Kind, tail: bytes) -> None:
    raw = b'{"model": "m",  "input": "\\u00e9", "max_tokens": 4}' + tail
    body = json.loads(raw)
    sent = upstream_body(kind, body, raw)
    assert sent.startswith(raw[: raw.rindex(b"}")])  # the client's bytes, not re-encoded
    assert json.loads(sent) == {**body, "stream": True}
    assert json.loads(upstream_body(kind, body)) == {**body, "stream": True}


@pytest.mark.parametrize("kind", ["responses", "messages"])
def test_upstream_body_keeps_the_clients_stream_options_and_adds_none(kind: Kind) -> None:
    body = {"model": "m", "stream": False, "stream_options": {"include_obfuscation": False}}
    raw = json.dumps(body).encode()
    assert json.loads(upstream_body(kind, body, raw)) == {**body, "stream": True}
    assert json.loads(upstream_body(kind, {"model": "m", "stream": False})) == {
        "model": "m",
        "stream": True,
    }
