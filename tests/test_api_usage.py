"""Usage per user from each API's own fields, and non-streaming answers assembled from an
upstream stream that are the model's own non-streaming answers.

- Usage: after each answer, the user's ``prompt_tokens`` and ``completion_tokens`` in
  ``/admin/status`` (and then ``/admin/usage``) went up by what that answer's usage said, in its
  API's words: ``input_tokens``/``output_tokens`` (Responses, Messages; for Messages the prompt
  is ``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``),
  ``tokens_evaluated``/``tokens_predicted`` (llama.cpp's own), ``prompt_tokens`` (rerank).
- Assembly: the echo asked directly, without a stream, is the oracle; a backend that answers
  with the request it received shows that the request went upstream as a stream.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.config import echo_cmd, model_server_cmd
from tests.support.daemon import running_daemon
from tests.support.ports import port_range
from tests.support.status import direct_client, load_model
from trioserve.config import parse_config

ALICE = "sk-alice"
TEXT = [{"role": "user", "content": "one two three"}]

# A Messages backend whose usage has cached prompt tokens, which the echo never reports. It
# streams whatever it is asked (the daemon asks for a stream either way).
CACHED = model_server_cmd(
    """
    def event(name, **value):
        value["type"] = name
        return ("event: " + name + "\\ndata: " + json.dumps(value) + "\\n\\n").encode()
    usage = {"input_tokens": 4, "cache_read_input_tokens": 10,
             "cache_creation_input_tokens": 6, "output_tokens": 1}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
               "model": "cached", "stop_reason": None, "stop_sequence": None, "usage": usage}
    answer = (
        event("message_start", message=message)
        + event("content_block_start", index=0, content_block={"type": "text", "text": ""})
        + event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"})
        + event("content_block_stop", index=0)
        + event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None},
                usage={"output_tokens": 3})
        + event("message_stop")
    )
    self.send_response(200)
    self.send_header("content-type", "text/event-stream")
    self.send_header("content-length", str(len(answer)))
    self.end_headers()
    self.wfile.write(answer)
    """
)

# A backend that answers every POST with the path and body it received, as JSON.
RECORDER = model_server_cmd(
    """
    answer = json.dumps({"path": self.path, "received": json.loads(body)}).encode()
    self.send_response(200)
    self.send_header("content-type", "application/json")
    self.send_header("content-length", str(len(answer)))
    self.end_headers()
    self.wfile.write(answer)
    """
)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]


def prompt_of(usage: dict[str, Any]) -> int:
    """Anthropic's prompt: what it read, from its cache or not, and what it wrote there."""
    keys = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    return sum(usage.get(key) or 0 for key in keys)


# Light requests: counted as requests, with no tokens (nothing was generated).
LIGHT = ("/v1/responses/input_tokens", "/v1/messages/count_tokens", "/tokenize")


def told(path: str, response: httpx.Response) -> tuple[int, int]:
    """(prompt, completion) tokens, as the answer's own usage fields tell them."""
    assert response.status_code == 200, response.text
    if path in LIGHT:
        assert "usage" not in response.json(), response.text
        return 0, 0
    if not response.headers["content-type"].startswith("text/event-stream"):
        answer = response.json()
        if path in ("/completion", "/infill"):
            return answer["tokens_evaluated"], answer["tokens_predicted"]
        usage = answer["usage"]
        if path == "/v1/rerank":
            return usage["prompt_tokens"], 0
        return prompt_of(usage), usage["output_tokens"]
    chunks = events(response)
    if path == "/v1/responses":
        (completed,) = [chunk for chunk in chunks if chunk["type"] == "response.completed"]
        usage = completed["response"]["usage"]
        return usage["input_tokens"], usage["output_tokens"]
    if path == "/v1/messages":
        (start,) = [chunk for chunk in chunks if chunk["type"] == "message_start"]
        deltas = [chunk for chunk in chunks if chunk["type"] == "message_delta"]
        return prompt_of(start["message"]["usage"]), deltas[-1]["usage"]["output_tokens"]
    return chunks[-1]["tokens_evaluated"], chunks[-1]["tokens_predicted"]


async def alice_in(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    """alice's entry in the users of ``url`` (``/admin/status``, ``/admin/usage``)."""
    entry: dict[str, Any] = (await client.get(url)).json()["users"].get("alice", {})
    return entry


async def test_each_apis_usage_is_counted_for_its_user(state_dir: Path) -> None:
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(state_dir)},
            "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
            "models": {"echo": {"cmd": echo_cmd()}, "cached": {"cmd": CACHED}},
            "users": {"alice": {"api_keys": [ALICE]}},
        },
        "test.toml",
    )
    asked: list[tuple[str, dict[str, Any]]] = [
        ("/v1/responses", {"model": "echo", "input": "one two three", "max_output_tokens": 4}),
        ("/v1/responses", {"model": "echo", "input": "one two", "stream": True}),
        ("/v1/messages", {"model": "echo", "max_tokens": 5, "messages": TEXT}),
        ("/v1/messages", {"model": "echo", "max_tokens": 3, "messages": TEXT, "stream": True}),
        ("/v1/messages", {"model": "cached", "max_tokens": 5, "messages": TEXT}),
        ("/v1/messages", {"model": "cached", "max_tokens": 5, "messages": TEXT, "stream": True}),
        ("/completion", {"model": "echo", "prompt": "a b c d", "n_predict": 6}),
        ("/completion", {"model": "echo", "prompt": "a b", "n_predict": 2, "stream": True}),
        ("/infill", {"model": "echo", "input_prefix": "x y", "input_suffix": "z"}),
        ("/v1/rerank", {"model": "echo", "query": "a b", "documents": ["a", "b c", "d"]}),
        ("/v1/responses/input_tokens", {"model": "echo", "input": "one two"}),
        ("/v1/messages/count_tokens", {"model": "echo", "messages": TEXT}),
        ("/tokenize", {"model": "echo", "content": "one two"}),
    ]
    headers = {"authorization": f"Bearer {ALICE}"}
    async with running_daemon(config, admin=True) as (_, client):
        prompt = completion = 0
        for number, (path, body) in enumerate(asked, 1):
            tokens = told(path, await client.post(path, json=body, headers=headers))
            assert all(tokens) or path == "/v1/rerank" or path in LIGHT, (path, tokens)
            prompt, completion = prompt + tokens[0], completion + tokens[1]
            with trio.fail_after(5):
                # Counted a moment after the client has its answer.
                while (entry := await alice_in(client, "/admin/status"))["requests"] < number:
                    await trio.sleep(0.01)
            counted = (entry["prompt_tokens"], entry["completion_tokens"])
            assert counted == (prompt, completion), (path, body, tokens)
        # The state store has the same, at most a second behind.
        expected = {
            "requests": len(asked),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
        }
        with trio.fail_after(5):
            while True:
                stored = await alice_in(client, "/admin/usage?since=1d")
                if stored and {key: stored[key] for key in expected} == expected:
                    break
                await trio.sleep(0.05)
        # The cached backend's prompt was 4 + 10 + 6 (twice), its completion 3.
        cached = stored["by_model"]["cached"]
        assert (cached["prompt_tokens"], cached["completion_tokens"]) == (2 * 20, 2 * 3), cached


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer less what differs between two answers to the same request: its ids and the
    second it was made in."""
    kept = {k: v for k, v in answer.items() if k not in ("id", "created_at", "completed_at")}
    if "output" in kept:
        kept["output"] = [{k: v for k, v in item.items() if k != "id"} for item in kept["output"]]
    return kept


async def test_non_streaming_answers_are_assembled_as_the_model_answers(state_dir: Path) -> None:
    models = {"echo": {"cmd": echo_cmd()}, "rec": {"cmd": RECORDER}}
    config = parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 0, "state_dir": str(state_dir)},
            "supervisor": {"port_range": port_range(), "stop_grace": 2, "start_timeout": 20},
            "models": models,
        },
        "test.toml",
    )
    asked: list[tuple[str, dict[str, Any]]] = [
        ("/v1/responses", {"input": "one two three"}),
        ("/v1/responses", {"input": "one two three", "max_output_tokens": 2}),
        ("/v1/responses", {"input": "a", "instructions": "be brief", "max_output_tokens": 0}),
        ("/v1/messages", {"messages": TEXT, "max_tokens": 100}),  # end_turn
        ("/v1/messages", {"messages": TEXT, "max_tokens": 3}),  # max_tokens
        ("/v1/messages", {"messages": TEXT, "system": "be brief", "max_tokens": 0}),
    ]
    async with running_daemon(config, admin=True) as (_, client), direct_client() as direct:
        port = (await load_model(client, "echo"))["port"]
        for path, body in asked:
            ours = await client.post(path, json={"model": "echo", **body})
            theirs = await direct.post(f"http://127.0.0.1:{port}{path}", json=body)
            assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
            assert ours.headers["content-type"] == "application/json"
            mine, model = ours.json(), theirs.json()
            assert comparable(mine) == comparable(model), (path, body)
            # What that means, spelled out: the text, how it ended, the usage.
            if path == "/v1/messages":
                assert (mine["content"], mine["stop_reason"]) == (
                    model["content"],
                    model["stop_reason"],
                )
            else:
                assert (mine["output"][0]["content"], mine["status"]) == (
                    model["output"][0]["content"],
                    model["status"],
                )
            assert mine["usage"] == model["usage"], (path, body)

        # Upstream, a non-streaming request was a stream; a streaming one went as it came.
        for path, body in asked[:1] + asked[3:4]:
            sent = {"model": "rec", **body}
            relayed = await client.post(path, json=sent)
            assert relayed.json() == {"path": path, "received": {**sent, "stream": True}}
            streamed = await client.post(path, json={**sent, "stream": True})
            assert streamed.json() == {"path": path, "received": {**sent, "stream": True}}
            plain = await client.post(path, json={**sent, "stream": False})
            assert plain.json() == {"path": path, "received": {**sent, "stream": True}}
