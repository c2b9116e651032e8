"""Usage of the APIs that do not count as OpenAI's chat does: the Responses API and Anthropic's
Messages (``input_tokens`` / ``output_tokens``; a message's stream tells them in two events),
llama.cpp's own ``/completion`` (``tokens_evaluated`` / ``tokens_predicted``), rerank and
embeddings; whole answers, streams however they are read, and streams cut short
(``trioserve.gateway.usage``). The streams and answers are llama-server's own (build 11434,
tests/data/llama-server-b11434/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trioserve.gateway.usage import (
    StreamUsage,
    UsageKind,
    generated,
    usage_in_body,
    usage_of,
)

DATA = Path(__file__).parent / "data" / "llama-server-b11434"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def fed(kind: UsageKind | None, data: bytes, size: int) -> StreamUsage:
    finder = StreamUsage(kind)
    for at in range(0, len(data), size):
        finder.feed(data[at : at + size])
    return finder


def events(stream: bytes) -> list[bytes]:
    """``stream`` one event per read, as llama-server writes them."""
    return [event + b"\n\n" for event in stream.split(b"\n\n") if event]


# -- whole answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "usage"),
    [
        ("responses.json", (33, 12)),  # input_tokens counts the cached ones
        ("messages.json", (33, 12)),  # input_tokens 5 + cache_read_input_tokens 28
        ("messages-stop.json", (33, 7)),
        ("completion.json", (3, 4)),  # llama.cpp's own: tokens_evaluated, tokens_predicted
    ],
)
def test_the_usage_of_llama_servers_whole_answers(name: str, usage: tuple[int, int]) -> None:
    assert usage_in_body(sample(name)) == usage


@pytest.mark.parametrize(
    ("answer", "usage"),
    [
        # Anthropic: the prompt tokens written to and read from its cache are apart.
        (
            {"type": "message", "usage": {"input_tokens": 10, "cache_creation_input_tokens": 200,
                                          "cache_read_input_tokens": 3000, "output_tokens": 7}},
            (3210, 7),
        ),
        ({"type": "message", "usage": {"input_tokens": 10, "cache_read_input_tokens": None,
                                       "output_tokens": 7}}, (10, 7)),
        ({"object": "response", "usage": {"input_tokens": 26, "output_tokens": 5,
                                          "input_tokens_details": {"cached_tokens": 21}}},
         (26, 5)),
        ({"object": "list", "usage": {"prompt_tokens": 7, "total_tokens": 7}}, (7, 0)),  # rerank
        ({"object": "list", "data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}},
         (4, 0)),  # embeddings
        ({"usage": {"input_tokens": -1, "output_tokens": 2}}, None),
        ({"usage": {"input_tokens": 1, "output_tokens": True}}, None),
        ({"tokens_predicted": 2, "tokens_evaluated": "3"}, None),
        ({"usage": None}, None),
    ],
)  # fmt: skip
def test_usage_of_each_apis_answer(answer: object, usage: tuple[int, int] | None) -> None:
    assert usage_of(answer) == usage
    assert usage_in_body(json.dumps(answer).encode()) == usage


def test_llama_cpps_completion_of_several_prompts_counts_them_all() -> None:
    one = json.loads(sample("completion.json"))
    body = json.dumps([one, {**one, "tokens_evaluated": 10, "tokens_predicted": 1}]).encode()
    assert usage_in_body(body) == (13, 5)
    assert usage_in_body(b'[{"tokens_predicted": null}]') is None


def test_the_usage_in_the_apis_events() -> None:
    # A Responses event carries its response, Messages' message_start its message.
    assert usage_of({"type": "response.completed", "response": {"usage": {
        "input_tokens": 3, "output_tokens": 4}}}) == (3, 4)  # fmt: skip
    assert usage_of({"type": "message_start", "message": {"usage": {
        "input_tokens": 3, "output_tokens": 0}}}) == (3, 0)  # fmt: skip


# -- streams ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "usage"),
    [
        ("responses", "responses.sse", (33, 12)),
        ("messages", "messages.sse", (33, 12)),
        ("messages", "messages-stop.sse", (33, 7)),
        ("native", "completion.sse", (3, 4)),
    ],
)
@pytest.mark.parametrize("size", [1, 7, 64, 100, 4096, 65536])
def test_a_streams_usage_however_it_is_read(
    kind: UsageKind, name: str, usage: tuple[int, int], size: int
) -> None:
    finder = fed(kind, sample(name), size)
    assert finder.usage() == usage
    assert finder.counted() == usage


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("responses", "responses.sse"),
        ("messages", "messages.sse"),
        ("native", "completion.sse"),
    ],
)
def test_a_whole_stream_is_whole_and_a_cut_one_is_not(kind: UsageKind, name: str) -> None:
    stream = sample(name)
    reads = events(stream)
    for split in (reads, [stream]):
        finder = StreamUsage(kind)
        for read in split:
            finder.feed(read)
        assert finder.whole
    finder = StreamUsage(kind)
    for read in reads[:-1]:
        finder.feed(read)
    assert not finder.whole
    # Nor is any stream without its end the chat way.
    chat = StreamUsage("chat")
    chat.feed(stream)
    assert not chat.whole


def test_a_whole_message_stream_without_usage_counts_none() -> None:
    stream = sample("messages.sse").replace(b',"usage":{"output_tokens":12}', b"")
    finder = StreamUsage("messages")
    for read in events(stream):
        finder.feed(read)
    assert finder.whole and finder.usage() is None and finder.counted() is None


@pytest.mark.parametrize(
    ("kind", "name", "marker", "prompt"),
    [
        ("responses", "responses.sse", b"event: response.output_text.delta", 0),
        # message_start told the prompt before the end: it counts.
        ("messages", "messages.sse", b"event: content_block_delta", 33),
    ],
)
def test_a_stream_cut_short_counts_its_token_events_only(
    kind: UsageKind, name: str, marker: bytes, prompt: int
) -> None:
    reads = events(sample(name))
    deltas = [i for i, read in enumerate(reads) if read.startswith(marker)]
    assert len(deltas) == 12
    for seen in (0, 1, 5, 12):
        finder = StreamUsage(kind)
        for read in reads[: deltas[seen] if seen < 12 else deltas[-1] + 1]:
            finder.feed(read)
        assert finder.usage() is None and not finder.whole
        assert finder.counted() == ((prompt, seen) if seen or prompt else None), seen


def test_llama_cpps_own_stream_counts_exactly_even_cut_short() -> None:
    reads = events(sample("completion.sse"))
    assert len(reads) == 5  # 4 tokens, then the last event with "stop": true
    for seen in (1, 3):
        finder = StreamUsage("native")
        for read in reads[:seen]:
            finder.feed(read)
        assert not finder.whole
        assert finder.usage() == finder.counted() == (3, seen)


def test_the_last_message_delta_counts_and_message_start_gives_the_input() -> None:
    start = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","type":'
        b'"message","role":"assistant","content":[],"model":"c","usage":{"input_tokens":40,'
        b'"cache_creation_input_tokens":5,"cache_read_input_tokens":100,"output_tokens":1}}}\n\n'
    )
    # The token "usage" is "usage" in its event, and no usage.
    word = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"usage"}}\n\n'  # noqa: E501
    deltas = [
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":null},'
        b'"usage":{"output_tokens":3}}\n\n',
        # Cumulative counts: Anthropic's may restate the input, a null is no count.
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"}'
        b',"usage":{"input_tokens":42,"cache_read_input_tokens":null,"output_tokens":9}}\n\n',
    ]
    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    stream = start + word * 3 + deltas[0] + word + deltas[1] + stop
    for size in (1, 5, 50, len(stream)):
        finder = fed("messages", stream, size)
        assert finder.usage() == (42 + 5 + 100, 9), size
    finder = fed("messages", start + word * 3 + deltas[0] + word, len(stream))
    assert finder.usage() == (145, 3)  # the last message_delta so far
    finder = fed("messages", start + word * 3, 7)
    assert finder.usage() is None
    assert finder.counted() == (145, 0)  # markers split between 7-byte reads are missed
    finder = fed("messages", start + word * 3, len(stream))
    assert finder.counted() == (145, 3)


def test_text_that_names_the_markers_is_no_token() -> None:
    # A quote inside JSON text is escaped: generated text cannot look like an event's type.
    text = b'event: content_block_delta \\"content_block_delta\\" .delta\\" data: x'
    stream = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    stream += b'"delta":{"type":"text_delta","text":"' + text + b'"}}\n\n'
    finder = StreamUsage("messages")
    finder.feed(stream)
    assert finder.events == 1


@pytest.mark.parametrize("kind", [None, "chat", "completion"])
def test_openai_streams_count_as_before(kind: UsageKind | None) -> None:
    word = b'data: {"choices":[{"index":0,"delta":{"content":"w"}}],"usage":null}\n\n'
    final = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
    finder = StreamUsage(kind)
    finder.feed(word * 3)
    assert (finder.usage(), finder.counted()) == (None, (0, 3))
    finder.feed(final + b"data: [DONE]\n\n")
    assert finder.whole and finder.usage() == finder.counted() == (7, 3)


def test_generated_counts_a_prompt_told_before_the_end() -> None:
    assert generated(0) is None
    assert generated(4) == (0, 4)
    assert generated(0, 30) == (30, 0)
    assert generated(4, 30) == (30, 4)
