"""The official OpenAI SDK, unchanged, on the daemon's newer OpenAI paths: the Responses API
(a plain answer, a stream read event by event, and the SDK's ``responses.stream`` helper) and
an audio transcription of a multi-MB file.

The echo backend answers the Responses API as llama-server does, so what works here works with
llama-server behind the daemon, and what fails here (the helper) fails there too."""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import openai
import pytest

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.status import backend_stats, direct_client, load_model
from trioserve.backends.echo.model import reply_tokens

# The SDK's stream iterators end without closing their inner async generators; under trio that
# is reported when they are collected (as in test_openai_sdk.py). Not a leak of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning"
)

WORDS = "alpha beta gamma"


def _client(url: str, timeout: float = 30) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout
    )


async def test_sdk_responses_answer_and_stream_with_usage(state_dir: Path) -> None:
    # 8 tokens 0.2 s apart: a stream's first delta comes 1.4 s before its generation ends.
    config = echo_config(state_dir, "--tokens", "8", "--token-delay", "0.2")
    async with running_daemon(config, admin=True) as (info, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        sdk = _client(info.url)

        reply = await sdk.responses.create(model="echo", input=WORDS, max_output_tokens=3)
        assert reply.status == "completed"
        assert reply.output_text == "".join(reply_tokens(WORDS, 3))
        assert reply.usage is not None
        assert (reply.usage.input_tokens, reply.usage.output_tokens) == (3, 3)

        # A short stream first: the SDK builds its types for a stream's events at their first
        # use (a second or more of CPU on a busy machine), which holds up that stream's events.
        short = await sdk.responses.create(
            model="echo", input=WORDS, max_output_tokens=2, stream=True
        )
        texts = [event.delta async for event in short if event.type == "response.output_text.delta"]
        assert texts == reply_tokens(WORDS, 2)

        stream = await sdk.responses.create(model="echo", input=WORDS, stream=True)
        deltas: list[str] = []
        completed = None
        async for event in stream:
            if event.type == "response.output_text.delta":
                if not deltas:
                    # Streamed through as it comes: the echo is still generating it.
                    stats = await backend_stats(port, direct)
                    assert stats["completed"] < stats["started"] == 3, stats
                deltas.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
        assert deltas == reply_tokens(WORDS, 8)
        assert completed is not None, "the stream had no response.completed"
        assert completed.status == "completed"
        assert completed.output_text == "".join(deltas)
        assert completed.usage is not None
        assert (completed.usage.input_tokens, completed.usage.output_tokens) == (3, 8)
        assert completed.usage.total_tokens == 11
        await sdk.close()
        gc.collect()


# The helper accumulates a snapshot from the events' ``output_index`` and ``content_index``.
# llama-server (build 11434) leaves both out of its Responses stream, and the echo answers as it
# does; the daemon relays the stream as it is. So the helper indexes a list with None at the
# first text delta. Once llama-server (and the echo) send the indices, or the SDK copes without
# them, the test passes, which strict xfail reports as a failure: then drop the marker.
HELPER_FAILS = (
    "openai's responses.stream() helper needs output_index/content_index in each event, which "
    "llama-server's stream (and the echo's, its copy) does not send: TypeError at the first "
    "response.output_text.delta"
)


@pytest.mark.xfail(
    # pytest-trio reports a test's exception inside its nursery's group.
    raises=pytest.RaisesGroup(pytest.RaisesExc(TypeError, match="not NoneType")),
    strict=True,
    reason=HELPER_FAILS,
)
async def test_sdk_responses_stream_helper(state_dir: Path) -> None:
    seen: list[str] = []
    failure: TypeError | None = None
    async with running_daemon(echo_config(state_dir)) as (info, _):
        sdk = _client(info.url)
        try:
            async with sdk.responses.stream(model="echo", input=WORDS) as stream:
                async for event in stream:
                    seen.append(event.type)
                final = await stream.get_final_response()
        except TypeError as error:
            failure = error  # raised below, once the daemon is down: not in its nursery's group
        finally:
            await sdk.close()
            gc.collect()
    if failure is not None:
        # Exactly this failure: the opening events come through, the first delta breaks.
        assert seen == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ], seen
        assert "not NoneType" in str(failure), failure
        raise failure
    assert seen.count("response.output_text.delta") == 8
    assert final.output_text == "".join(reply_tokens(WORDS, 8))


AUDIO_SIZE = 3 * 1024 * 1024  # past the daemon's memory threshold for an upload (1 MiB)


async def test_sdk_transcribes_a_multi_mb_file_whole(state_dir: Path) -> None:
    data = hashlib.shake_256(b"sdk audio").digest(AUDIO_SIZE)
    digest = hashlib.sha256(data).hexdigest()[:16]
    # The echo names the byte count and digest of what arrived: every byte, unchanged.
    heard = f"echo: received {AUDIO_SIZE} bytes of audio (speech.wav), sha256 {digest}"
    # Seconds are plenty for 3 MB over loopback: a hung upload fails well before 30 s.
    async with (
        running_daemon(echo_config(state_dir)) as (info, _),
        _client(info.url, timeout=10) as sdk,
    ):
        upload = ("speech.wav", data, "audio/wav")
        transcription = await sdk.audio.transcriptions.create(model="echo", file=upload)
    assert transcription.text == heard
