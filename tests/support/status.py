"""What a running daemon and its echo backends report, and waiting until they report it."""

from __future__ import annotations

from typing import Any

import httpx
import trio


async def model_status(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    """``model``'s entry of ``/admin/status``."""
    info: dict[str, Any] = (await client.get("/admin/status")).json()["models"][model]
    return info


async def load_model(client: httpx.AsyncClient, model: str, **kwargs: Any) -> dict[str, Any]:
    """Load ``model`` (it must come up ready); returns its ``/admin/status`` entry. ``client``
    is the daemon's admin (``running_daemon(config, admin=True)``, ``tests.support.admin``)."""
    response = await client.post(f"/admin/models/{model}/load", **kwargs)
    assert response.status_code == 200, response.text
    info = await model_status(client, model)
    assert info["state"] == "ready", info
    return info


async def load_models(client: httpx.AsyncClient, *models: str) -> list[dict[str, Any]]:
    """``load_model`` for each of ``models``, one after the other; their status entries."""
    return [await load_model(client, model) for model in models]


async def wait_for_status(
    client: httpx.AsyncClient, model: str, key: str, value: Any, within: float = 5.0
) -> dict[str, Any]:
    """Poll ``/admin/status`` until ``model``'s ``key`` is ``value``; returns the entry."""
    with trio.fail_after(within):
        while (info := await model_status(client, model))[key] != value:
            await trio.sleep(0.01)
    return info


async def backend_port(client: httpx.AsyncClient, model: str) -> int:
    """The port of ``model``'s running backend."""
    info = await model_status(client, model)
    assert info["port"], f"model {model} is not running: {info}"
    return int(info["port"])


def direct_client() -> httpx.AsyncClient:
    """A client for talking to a backend straight, past the daemon (``backend_stats``' ``client``).

    Opened once per test, before what it times: making an ``httpx.AsyncClient`` costs tens of
    milliseconds (its TLS context), which a poll that opens one each time would measure."""
    return httpx.AsyncClient(trust_env=False)


async def backend_stats(port: int, client: httpx.AsyncClient | None = None) -> dict[str, int]:
    """The echo backend's own counters (``/stats``): started, completed, cancelled. Over
    ``client`` (see ``direct_client``) when given, else over a client of its own."""
    if client is None:
        async with direct_client() as own:
            return await backend_stats(port, own)
    response = await client.get(f"http://127.0.0.1:{port}/stats")
    response.raise_for_status()
    return dict(response.json())


async def wait_for_stats(
    port: int,
    key: str,
    at_least: int,
    within: float = 5.0,
    client: httpx.AsyncClient | None = None,
) -> dict[str, int]:
    """Poll the echo backend's /stats until ``key >= at_least``; returns the stats. Every poll
    goes over one client (``client``, else one opened for the wait)."""
    if client is None:
        async with direct_client() as own:
            return await wait_for_stats(port, key, at_least, within, own)
    with trio.fail_after(within):
        while (stats := await backend_stats(port, client))[key] < at_least:
            await trio.sleep(0.01)
    return stats
