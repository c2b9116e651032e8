"""The official OpenAI Python SDK against the daemon: what users will actually run."""

from __future__ import annotations

import gc
from pathlib import Path

import openai
import pytest
import trio

from tests.support.config import echo_config
from tests.support.daemon import running_daemon
from tests.support.status import load_model, wait_for_status

# openai's stream iterator stops at [DONE] without closing its inner async generator; under
# trio that is reported when the generator is collected. Not a leak of ours.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning", "ignore::ResourceWarning"
)


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


async def test_sdk_chat_completions_and_embeddings(state_dir: Path) -> None:
    config = echo_config(state_dir, "--tokens", "6", "--token-delay", "0.2")
    async with running_daemon(config) as (info, _):
        sdk = _client(info.url)
        reply = await sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hello world"}]
        )
        assert reply.choices[0].message.content == "hello world hello world hello world"

        start = trio.current_time()
        stream = await sdk.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        arrivals = []
        text = ""
        async for chunk in stream:
            arrivals.append(trio.current_time() - start)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        assert text.split() == ["hi"] * 6
        # 6 tokens × 0.2 s: the first chunk comes long before the last one is produced.
        assert arrivals[0] < 0.8 < arrivals[-1]

        completion = await sdk.completions.create(model="echo", prompt="one two")
        assert completion.choices[0].text.startswith("one two")

        embedding = await sdk.embeddings.create(model="echo", input="abc")
        again = await sdk.embeddings.create(model="echo", input="abc")
        assert embedding.data[0].embedding == again.data[0].embedding
        await sdk.close()
        gc.collect()


async def test_sdk_exception_types_for_404_429_504(state_dir: Path) -> None:
    config = echo_config(
        state_dir,
        "--response-delay",
        "3",
        name="slow",
        max_concurrency=1,
        max_queue=0,
        server={"first_byte_timeout": 1},
    )
    async with running_daemon(config, admin=True) as (info, client):
        sdk = _client(info.url)
        with pytest.raises(openai.NotFoundError) as not_found:
            await sdk.chat.completions.create(model="nope", messages=[])
        assert not_found.value.code == "model_not_found"

        await load_model(client, "slow")
        async with trio.open_nursery() as nursery:
            busy = trio.Event()

            async def occupy() -> None:
                busy.set()
                with pytest.raises(openai.APIStatusError) as timed_out:
                    await sdk.chat.completions.create(model="slow", messages=[])
                assert timed_out.value.status_code == 504

            nursery.start_soon(occupy)
            await busy.wait()
            await wait_for_status(client, "slow", "in_flight", 1)
            with pytest.raises(openai.RateLimitError) as limited:
                await sdk.chat.completions.create(model="slow", messages=[])
            assert limited.value.code == "queue_full"
        await sdk.close()
