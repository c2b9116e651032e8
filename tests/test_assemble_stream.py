"""The assembler on hand-built streams: SSE framing split anywhere, errors, what it refuses,
and the request it sends upstream (``trioserve.gateway.assemble``, no I/O).

Where the OpenAI SDK can judge, its own accumulation (``ChatCompletionStreamState``) of the same
chunks is the oracle; test_assemble.py checks the same against live streams of the echo backend.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from tests.support.assembly import as_sdk_sees, assemble, comparable
from trioserve.gateway.assemble import (
    Assembled,
    Assembler,
    BrokenStream,
    error_status,
    upstream_body,
)

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def sdk_accumulation(stream: bytes) -> dict[str, Any]:
    """The SDK's ``ChatCompletionStreamState`` fed the chunks of ``stream``."""
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for event in stream.split(b"\n\n"):
        if event.startswith(b"data: {"):
            state.handle_chunk(ChatCompletionChunk.model_validate_json(event[6:]))
    return comparable(state.get_final_completion())


# -- against the SDK's accumulation -----------------------------------------------------------


LLAMA_REASONING = (
    b"".join(
        b"data: "
        + json.dumps(
            {
                "choices": choices,
                "created": 1700000000,
                "id": "chatcmpl-abc",
                "model": "gemma",
                "system_fingerprint": "b1234",
                "object": "chat.completion.chunk",
                **extra,
            }
        ).encode()
        + b"\n\n"
        for choices, extra in [
            (
                [
                    {
                        "finish_reason": None,
                        "index": 0,
                        "delta": {"role": "assistant", "content": None},
                    }
                ],
                {},
            ),
            ([{"finish_reason": None, "index": 0, "delta": {"reasoning_content": "Think"}}], {}),
            ([{"finish_reason": None, "index": 0, "delta": {"reasoning_content": "ing…"}}], {}),
            ([{"finish_reason": None, "index": 0, "delta": {"content": "Hé"}}], {}),
            ([{"finish_reason": None, "index": 0, "delta": {"content": "llo"}}], {}),
            ([{"finish_reason": "stop", "index": 0, "delta": {}}], {"timings": {"predicted_n": 1}}),
            (
                [],
                {
                    "usage": {"completion_tokens": 4, "prompt_tokens": 3, "total_tokens": 7},
                    "timings": {"predicted_n": 4},
                },
            ),
        ]
    )
    + b"data: [DONE]\n\n"
)


def test_reasoning_content_usage_and_fingerprint_equal_the_sdks() -> None:
    answer = assemble("chat", [LLAMA_REASONING])
    ours = as_sdk_sees(answer)
    # The SDK keeps the extra top-level fields of the first chunk only: see the next test.
    assert ours.pop("timings") == {"predicted_n": 4}
    assert ours == sdk_accumulation(LLAMA_REASONING)
    message = json.loads(answer.body)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Héllo", "reasoning_content": "Thinking…"}


def test_extra_top_level_fields_are_kept_and_the_last_one_wins() -> None:
    body = json.loads(assemble("chat", [LLAMA_REASONING]).body)
    # The SDK keeps only what the first chunk had; llama-server's timings come last.
    assert body["timings"] == {"predicted_n": 4}
    assert body["system_fingerprint"] == "b1234"
    assert body["usage"] == {"completion_tokens": 4, "prompt_tokens": 3, "total_tokens": 7}
    assert list(body)[:5] == ["id", "object", "created", "model", "choices"]


def test_a_stream_only_field_and_nulls_do_not_override() -> None:
    chunks = [
        {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "service_tier": "default", "obfuscation": "aZ",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"},
                      "logprobs": None, "finish_reason": None}], "usage": None},
        {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "service_tier": None, "obfuscation": "q",
         "choices": [{"index": 0, "delta": {"content": "b"}, "logprobs": None,
                      "finish_reason": "stop"}], "usage": None},
    ]  # fmt: skip
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    stream += b"data: [DONE]\n\n"
    body = json.loads(assemble("chat", [stream]).body)
    assert "obfuscation" not in body and "usage" not in body
    assert body["service_tier"] == "default"
    assert as_sdk_sees(assemble("chat", [stream])) == sdk_accumulation(stream)


# -- errors -----------------------------------------------------------------------------------


def test_the_error_event_ends_the_assembly() -> None:
    assembler = Assembler("chat")
    assembler.feed(b'data: {"error":{"code":507,"message":"full","type":"server_error"}}\n\n')
    assert assembler.done
    assembler.feed(b"data: not even json\n\n")  # whatever follows is not read
    assert assembler.result().status == 507


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ({"code": 400, "message": "m", "type": "exceed_context_size_error"}, 400),
        ({"code": "503", "message": "m"}, 503),
        ({"code": "server_error", "message": "m", "type": "rate_limit_error"}, 429),
        ({"code": None, "message": "m", "type": "invalid_request_error"}, 400),
        ({"code": 200, "message": "not an error status"}, 500),
        ({"code": True, "type": "whatever"}, 500),
        ({"code": "²", "message": "a digit to str.isdigit, not to int"}, 500),
        ("a bare string", 500),
    ],
)
def test_error_status(error: object, status: int) -> None:
    assert error_status(error) == status


def test_a_stream_without_done_is_broken() -> None:
    stream = LLAMA_REASONING.removesuffix(b"data: [DONE]\n\n")
    assembler = Assembler("chat")
    assembler.feed(stream)
    assert not assembler.done
    with pytest.raises(BrokenStream, match=r"ended before 'data: \[DONE\]' \(after 7 events\)"):
        assembler.result()
    assert BrokenStream("x").status == 502  # an upstream_error for the client


@pytest.mark.parametrize(
    "stream",
    [
        LLAMA_REASONING[:300],  # cut inside an event
        b"data: {not json}\n\n",
        b"data: [1, 2]\n\n",
        b'data: {"choices": [{"index": "0", "delta": {}}]}\n\ndata: [DONE]\n\n',
        b'data: {"choices": [{"index": 0, "text": 5}]}\n\ndata: [DONE]\n\n',
        b'data: {"choices": [{"index": 0, "delta": ["x"]}]}\n\ndata: [DONE]\n\n',
        b'data: {"choices": 7}\n\ndata: [DONE]\n\n',
        b": only a comment\n\ndata: [DONE]\n\n",
        b"",
    ],
    ids=["cut", "not-json", "not-object", "index", "text", "delta", "choices", "empty", "none"],
)
def test_a_broken_stream_raises_broken_stream(stream: bytes) -> None:
    assembler = Assembler("completion" if b'"text"' in stream else "chat")
    with pytest.raises(BrokenStream):
        assembler.feed(stream)
        assembler.result()


def test_a_backend_that_ignores_stream_true_is_passed_through() -> None:
    whole = b'{"id":"x","object":"chat.completion","choices":[]}'
    assembler = Assembler("chat", 200, "application/json")
    assembler.feed(whole[:10])
    assembler.feed(whole[10:])
    assert assembler.result() == Assembled(200, b"application/json", whole)


# -- SSE framing ------------------------------------------------------------------------------


SAMPLE = LLAMA_REASONING.replace(b'"H\\u00e9"', '"Hé €"'.encode())
SAMPLE_ANSWER = assemble("chat", [SAMPLE])


def test_the_sample_has_raw_utf8() -> None:
    assert "Hé €".encode() in SAMPLE
    assert json.loads(SAMPLE_ANSWER.body)["choices"][0]["message"]["content"] == "Hé €llo"


def reframed(stream: bytes, newline: bytes, comments: bool) -> bytes:
    """The same events with other line ends, and comment lines and unused fields between."""
    events = stream.split(b"\n\n")
    extra = b": keep-alive" + newline + b"event: message" + newline if comments else b""
    return b"".join(extra + e.replace(b"\n", newline) + newline * 2 for e in events if e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    comments=st.booleans(),
)
def test_any_split_of_any_framing_changes_nothing(
    data: st.DataObject, newline: bytes, comments: bool
) -> None:
    stream = reframed(SAMPLE, newline, comments)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert assemble("chat", reads) == SAMPLE_ANSWER


def test_multi_line_data_and_an_unterminated_last_event() -> None:
    chunk = {"id": "i", "created": 1, "model": "m", "choices": [{"index": 0, "text": "a\nb"}]}
    lines = json.dumps(chunk, indent=1).encode().split(b"\n")
    # One event, its JSON over several data lines ("data: x" and "data:x" alike).
    event = b"".join(b"data: " * (i % 2 == 0) + b"data:" * (i % 2) + line.strip() + b"\n"
                     for i, line in enumerate(lines))  # fmt: skip
    assembler = Assembler("completion")
    for read in (event, b"\n", b"data: [DONE]"):  # no blank line after [DONE]
        assembler.feed(read)
    assert json.loads(assembler.result().body)["choices"][0]["text"] == "a\nb"


def test_tool_call_ids_and_names_are_taken_once_arguments_joined() -> None:
    # Some servers repeat id, type and name in every delta of a call; OpenAI sends them once,
    # first. The first value is the one taken (the SDK would concatenate them).
    pieces = [("call_1", "weather", '{"city"'), ("call_2", "again", ': "Paris"}')]
    deltas = [
        {"index": 0, "id": ident, "type": "function",
         "function": {"name": name, "arguments": piece}}
        for ident, name, piece in pieces
    ]  # fmt: skip
    chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]} for delta in deltas]
    stream = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    message = json.loads(assemble("chat", [stream + b"data: [DONE]\n\n"]).body)["choices"][0]
    assert message["message"]["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
        }
    ]


def test_the_role_and_finish_reason_are_the_streams() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "model", "content": "x"}}]},
        {"choices": [{"index": 0, "delta": {"role": "other"}, "finish_reason": "length"}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": None}]},
    ]
    stream = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    choice = json.loads(assemble("chat", [stream + b"data: [DONE]\n\n"]).body)["choices"][0]
    assert choice["message"] == {"role": "model", "content": "x"}  # the first role sent
    assert choice["finish_reason"] == "length"  # the last one that was not null


# -- the request sent upstream ----------------------------------------------------------------


def test_upstream_body_streams_with_usage_and_keeps_the_rest() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "\ud800 lone surrogate, ünïcode"}],
        "stream": False,
        "stream_options": {"continuous_usage_stats": True, "include_usage": False},
        "n": 2,
        "tools": TOOLS,
        "cache_prompt": False,
    }
    sent = json.loads(upstream_body("chat", body))
    assert sent == {
        **body,
        "stream": True,
        "stream_options": {"continuous_usage_stats": True, "include_usage": True},
    }
    assert json.loads(upstream_body("chat", {"model": "m", "stream_options": None}))[
        "stream_options"
    ] == {"include_usage": True}
    assert body["stream"] is False  # the client's request is not changed


@pytest.mark.parametrize("tail", [b"", b" \r\n"])
def test_upstream_body_adds_to_the_clients_bytes_when_it_can(tail: bytes) -> None:
    raw = b'{"model": "m",  "messages": [{"role": "user", "content": "\\u00e9"}]}' + tail
    body = json.loads(raw)
    sent = upstream_body("chat", body, raw)
    assert sent.startswith(raw[: raw.rindex(b"}")])  # the client's bytes, not re-encoded
    assert json.loads(sent) == json.loads(upstream_body("chat", body))
    assert json.loads(sent) == {**body, "stream": True, "stream_options": {"include_usage": True}}


def test_upstream_body_encodes_again_when_the_client_set_stream() -> None:
    raw = b'{"model": "m", "stream": false}'
    sent = upstream_body("completion", json.loads(raw), raw)
    assert json.loads(sent) == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
