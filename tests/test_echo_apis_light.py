"""The echo backend's light endpoints, answered at once even behind slow generations:
llama.cpp's /tokenize, /detokenize, /apply-template, /slots, /props, /metrics, and rerank.
The echo runs as the real child process the daemon starts."""

from __future__ import annotations

from typing import Any

import trio

from tests.support.echo import echo_backend, llama_error

TEXTS = ["Say hi", "hello  world\n\tand more", "héllo wörld, 日本語 😀!", "", "   "]


def metric(text: str, name: str) -> float:
    """The value of ``llamacpp:name`` in a Prometheus text answer."""
    for line in text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no llamacpp:{name} in {text!r}")


async def test_tokenize_and_detokenize_round_trip() -> None:
    async with echo_backend() as echo:
        for text in TEXTS:
            tokens = (await echo.client.post("/tokenize", json={"content": text})).json()
            assert list(tokens) == ["tokens"]
            ids = tokens["tokens"]
            assert all(isinstance(token, int) and 0 <= token < 1 << 31 for token in ids)
            back = await echo.client.post("/detokenize", json={"tokens": ids})
            assert back.json() == {"content": text}
        assert (await echo.client.post("/tokenize", json={"content": "hello"})).json()[
            "tokens"
        ] != (await echo.client.post("/tokenize", json={"content": "hellp"})).json()["tokens"]

        pieces = await echo.client.post(
            "/tokenize", json={"content": "Say hi", "with_pieces": True}
        )
        assert [token["piece"] for token in pieces.json()["tokens"]] == ["Say", " hi"]
        emoji = await echo.client.post("/tokenize", json={"content": "😀", "with_pieces": True})
        # Pieces that are not whole UTF-8 characters come as bytes, as llama-server's.
        assert [token["piece"] for token in emoji.json()["tokens"]] == [[240, 159, 152], [128]]

        special = await echo.client.post("/tokenize", json={"content": "hi", "add_special": True})
        with_bos = special.json()["tokens"]
        assert (await echo.client.post("/detokenize", json={"tokens": with_bos})).json() == {
            "content": "<bos>hi"
        }
        # detokenize.json: Gemma's eos and bos.
        eos_bos = await echo.client.post("/detokenize", json={"tokens": [1, 2]})
        assert eos_bos.json() == {"content": "<eos><bos>"}

        unknown = await echo.client.post("/detokenize", json={"tokens": [5]})
        llama_error(unknown, 400, "invalid_request_error")
        not_ids = await echo.client.post("/detokenize", json={"tokens": ["a"]})
        llama_error(not_ids, 400, "invalid_request_error")
        no_content = await echo.client.post("/tokenize", json={})
        llama_error(no_content, 400, "invalid_request_error")


async def test_apply_template_is_the_models_chatml() -> None:
    async with echo_backend() as echo:
        messages = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
        ]
        answer = await echo.client.post("/apply-template", json={"messages": messages})
        assert answer.json() == {
            "prompt": "<|im_start|>system\nbe brief<|im_end|>\n"
            "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
        }
        bad = await echo.client.post("/apply-template", json={"messages": "hi"})
        llama_error(bad, 400, "invalid_request_error")
        assert "<|im_start|>" in (await echo.client.get("/props")).json()["chat_template"]


async def test_rerank_orders_documents_by_words_shared_with_the_query() -> None:
    documents = ["green pear", "red apple pie", "an apple", "RED APPLE"]
    async with echo_backend() as echo:
        for path in ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking"):
            body = {"model": "ranker", "query": "red apple", "documents": documents}
            answer = (await echo.client.post(path, json=body)).json()
            assert list(answer) == ["model", "object", "usage", "results"]
            assert (answer["model"], answer["object"]) == ("ranker", "list")
            assert answer["results"] == [
                {"index": 1, "relevance_score": 1.0},
                {"index": 3, "relevance_score": 1.0},
                {"index": 2, "relevance_score": 0.5},
                {"index": 0, "relevance_score": 0.0},
            ]
            # The query's words and the document's, for each document: 2 * 4 + 2 + 3 + 2 + 2.
            assert answer["usage"] == {"prompt_tokens": 17, "total_tokens": 17}
        top = (await echo.client.post("/v1/rerank", json={**body, "top_n": 2})).json()
        assert [result["index"] for result in top["results"]] == [1, 3]
        objects = {"query": "pear", "documents": [{"text": "apple"}, {"text": "pear"}]}
        ranked = (await echo.client.post("/v1/rerank", json=objects)).json()
        assert ranked["model"] == "echo"
        assert [result["index"] for result in ranked["results"]] == [1, 0]
        # TEI's shape: a list, "score", and the texts when asked.
        tei = {"query": "pear", "texts": ["apple", "pear"], "return_text": True}
        assert (await echo.client.post("/rerank", json=tei)).json() == [
            {"index": 1, "score": 1.0, "text": "pear"},
            {"index": 0, "score": 0.0, "text": "apple"},
        ]
        for bad in ({"query": "x", "documents": []}, {"documents": ["a"]}, {"query": "x"}):
            llama_error(
                await echo.client.post("/v1/rerank", json=bad), 400, "invalid_request_error"
            )


async def test_slots_props_and_metrics_follow_the_generations_in_flight() -> None:
    # 3 streams of 1000 tokens at 10 ms: 10 s each, cancelled long before.
    async with echo_backend("--parallel", "2", "--tokens", "1000", "--token-delay", "0.01") as echo:
        props = (await echo.client.get("/props")).json()
        assert props["total_slots"] == 2
        assert props["default_generation_settings"]["n_ctx"] > 0
        assert {"model_path", "model_alias", "build_info", "chat_template"} <= set(props)
        idle = (await echo.client.get("/slots")).json()
        assert [(slot["id"], slot["is_processing"]) for slot in idle] == [(0, False), (1, False)]
        assert (await echo.client.get("/slots?fail_on_no_slot=1")).status_code == 200
        metrics = await echo.client.get("/metrics")
        assert metrics.headers["content-type"] == "text/plain; version=0.0.4"
        assert metric(metrics.text, "requests_processing") == 0

        async def stream(started: trio.Event) -> None:
            body = {"prompt": "busy", "stream": True}
            async with echo.client.stream("POST", "/completion", json=body) as response:
                async for _ in response.aiter_lines():
                    started.set()

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                started = trio.Event()
                nursery.start_soon(stream, started)
                await started.wait()
            busy = (await echo.client.get("/slots")).json()
            assert [slot["is_processing"] for slot in busy] == [True, True]
            metrics = await echo.client.get("/metrics")
            assert metric(metrics.text, "requests_processing") == 2
            assert metric(metrics.text, "requests_deferred") == 1
            # The query string is honoured: no idle slot is a 503.
            full = await echo.client.get("/slots?fail_on_no_slot=1")
            assert llama_error(full, 503, "unavailable_error") == "no slot available"
            nursery.cancel_scope.cancel()
        await echo.wait_stats("cancelled", 3)
        after = (await echo.client.get("/slots")).json()
        assert [slot["is_processing"] for slot in after] == [False, False]
        assert metric((await echo.client.get("/metrics")).text, "requests_processing") == 0

        erased = await echo.client.post("/slots/1?action=erase")
        assert erased.json() == {"id_slot": 1, "n_erased": 0}
        saved = await echo.client.post("/slots/0?action=save")
        llama_error(saved, 501, "not_supported_error")
        for path in ("/slots/0?action=nothing", "/slots/7?action=erase", "/slots/x?action=erase"):
            llama_error(await echo.client.post(path), 400, "invalid_request_error")


async def test_metrics_count_the_tokens_of_completed_generations() -> None:
    async with echo_backend("--tokens", "3") as echo:
        before = (await echo.client.get("/metrics")).text
        assert metric(before, "tokens_predicted_total") == 0
        await echo.client.post(
            "/v1/messages", json={"messages": [{"role": "user", "content": "a b"}]}
        )
        await echo.client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "c"}]}
        )
        after = (await echo.client.get("/metrics")).text
        assert metric(after, "tokens_predicted_total") == 6
        assert metric(after, "prompt_tokens_total") == 3


async def test_light_endpoints_answer_at_once_behind_slow_generations() -> None:
    # A generation here takes at least 10 s: any light answer that waited would show.
    async with echo_backend("--response-delay", "10", "--token-delay", "1") as echo:
        light: list[tuple[str, str, dict[str, Any] | None]] = [
            ("POST", "/tokenize", {"content": "a b"}),
            ("POST", "/detokenize", {"tokens": [1]}),
            ("POST", "/apply-template", {"messages": [{"role": "user", "content": "a"}]}),
            ("POST", "/v1/messages/count_tokens", {"messages": []}),
            ("POST", "/v1/responses/input_tokens", {"input": "a"}),
            ("POST", "/v1/rerank", {"query": "a", "documents": ["a"]}),
            ("GET", "/slots", None),
            ("GET", "/props", None),
            ("GET", "/metrics", None),
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: echo.client.post("/v1/messages", json={"messages": [], "stream": False})
            )
            nursery.start_soon(lambda: echo.client.post("/v1/responses", json={"input": "slow"}))
            await echo.wait_stats("started", 2)
            for method, path, body in light:
                asked_at = trio.current_time()
                response = await echo.client.request(method, path, json=body)
                assert response.status_code == 200, (path, response.text)
                assert trio.current_time() - asked_at < 2, path
            assert await echo.stats() == {"started": 2, "completed": 0, "cancelled": 0}
            nursery.cancel_scope.cancel()


async def test_new_apis_answer_loading_and_unknown_paths_as_before() -> None:
    async with echo_backend("--startup-delay", "30", wait_healthy=False) as echo:
        assert (await echo.first_answer()).status_code == 503
        loading = await echo.client.post("/v1/messages", json={"messages": []})
        assert llama_error(loading, 503, "unavailable_error") == "Loading model"
        llama_error(
            await echo.client.post("/tokenize", json={"content": "a"}), 503, "unavailable_error"
        )
        unknown = await echo.client.get("/v1/nothing-here")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "not_found"
        wrong_method = await echo.client.get("/v1/messages")
        llama_error(wrong_method, 405, "invalid_request_error")
