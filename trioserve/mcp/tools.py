"""The tools: ``chat``, ``embed``, ``models``; in admin sessions ``load_model``,
``unload_model`` (hidden from others by ``views.py``, and refused here too).

A model's error or a deadline is a tool result with ``isError`` and the relay's message, not a
protocol error. Every tool is ``async def``: the SDK runs plain ``def`` tools in worker
threads, and the daemon's state belongs to its trio loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from trioserve.config import Config
from trioserve.errors import TrioserveError
from trioserve.gateway.relay import Relay
from trioserve.mcp.context import caller, model_view
from trioserve.mcp.relay_call import call_relay
from trioserve.mcp.sessions import Sessions
from trioserve.supervision.supervisor import Supervisor

__all__ = ["ADMIN_TOOLS", "ChatResult", "ToolDeps", "model_names", "register_tools"]

ADMIN_TOOLS = frozenset({"load_model", "unload_model"})


class Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class ChatResult(BaseModel):
    model: str
    content: str
    finish_reason: str | None
    usage: Usage | None


class ChatMessage(BaseModel):
    role: str = Field(description="system, user, assistant or tool")
    content: str | list[dict[str, Any]]


@dataclass
class ToolDeps:
    relay: Relay
    supervisor: Supervisor
    sessions: Sessions
    config: Callable[[], Config]


def model_names(config: Config) -> list[str]:
    """Every name a call may use: the configured models and their aliases."""
    names: list[str] = []
    for name, model in config.models.items():
        names.append(name)
        names.extend(model.aliases)
    return names


def _text(text: str, *, error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=error)


def _hidden(name: str) -> CallToolResult:
    # The same answer as for a tool that does not exist: a user session learns nothing more.
    return _text(f"Unknown tool: {name}", error=True)


def register_tools(mcp: MCPServer[Any], deps: ToolDeps) -> None:
    """Add the tools to ``mcp``; they read ``deps`` (the live config) per call."""

    @mcp.tool(
        description=(
            "Ask a model for a chat completion. Give `messages` (OpenAI chat format) or a "
            "`prompt`; `system` is put first. The model is started on demand; progress is "
            "reported while it starts or waits and while it generates."
        ),
        # Not read-only: a call may start a model (stopping an idle one) and spends budget.
        annotations=ToolAnnotations(read_only_hint=False, open_world_hint=False),
    )
    async def chat(
        ctx: Context,
        model: Annotated[str, Field(description="A configured model name or alias")],
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
        system: str | None = None,
        max_tokens: Annotated[int | None, Field(ge=1)] = None,
        temperature: Annotated[float | None, Field(ge=0)] = None,
        options: Annotated[
            dict[str, Any] | None,
            Field(description="Other sampling options, sent as they are (top_p, seed, stop, …)"),
        ] = None,
    ) -> Annotated[CallToolResult, ChatResult]:
        chat_messages: list[dict[str, Any]] = []
        if system is not None:
            chat_messages.append({"role": "system", "content": system})
        if messages:
            chat_messages.extend(m.model_dump() for m in messages)
        if prompt is not None:
            chat_messages.append({"role": "user", "content": prompt})
        if not messages and prompt is None:
            return _text("give `messages` or a `prompt`", error=True)
        payload: dict[str, Any] = {**(options or {})}
        payload.update(model=model, messages=chat_messages, stream=True)
        payload["stream_options"] = {"include_usage": True}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = temperature
        token = (ctx.request_context.meta or {}).get("progress_token")
        report = ctx.report_progress if token is not None else None
        answer = await call_relay(
            deps.relay,
            caller(),
            "/v1/chat/completions",
            payload,
            progress=report,
            total=max_tokens,
        )
        if answer.error is not None:
            return _text(answer.error, error=True)
        choice = (answer.body.get("choices") or [{}])[0]
        content = (choice.get("message") or {}).get("content") or ""
        usage = answer.body.get("usage")
        # A ChatResult's JSON form, built as a dict: the SDK validates structured content
        # against ChatResult (the output schema) anyway, so a model made here and dumped
        # again would be the same work twice.
        structured = {
            "model": str(answer.body.get("model") or model),
            "content": content,
            "finish_reason": choice.get("finish_reason"),
            "usage": (
                Usage.model_validate(usage).model_dump(mode="json")
                if isinstance(usage, dict)
                else None
            ),
        }
        return CallToolResult(
            content=[TextContent(type="text", text=content)],
            structured_content=structured,
        )

    @mcp.tool(
        description="Embeddings of `input` (a text or a list of texts) by `model`.",
        # Not read-only either: a model may be started for it.
        annotations=ToolAnnotations(read_only_hint=False, open_world_hint=False),
    )
    async def embed(
        model: Annotated[str, Field(description="A configured model name or alias")],
        input: str | list[str],
    ) -> CallToolResult:
        payload = {"model": model, "input": input}
        answer = await call_relay(deps.relay, caller(), "/v1/embeddings", payload)
        if answer.error is not None:
            return _text(answer.error, error=True)
        vectors = [item.get("embedding") for item in answer.body.get("data") or []]
        structured = {
            "model": answer.body.get("model") or model,
            "embeddings": vectors,
            "usage": answer.body.get("usage"),
        }
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(vectors))],
            structured_content=structured,
        )

    @mcp.tool(
        description="Every configured model: state, requests in flight and queued, last error.",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False),
    )
    async def models() -> CallToolResult:
        config = deps.config()
        status = deps.supervisor.status()
        listed = {
            name: {
                "aliases": list(config.models[name].aliases) if name in config.models else [],
                **model_view(info.as_dict(), admin=False),
            }
            for name, info in status.items()
        }
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(listed, indent=1))],
            structured_content={"models": listed},
        )

    @mcp.tool(
        description="Admin: start a model now (it is started on demand otherwise).",
        annotations=ToolAnnotations(
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def load_model(name: str) -> CallToolResult:
        if not caller().admin:
            return _hidden("load_model")
        try:
            model = deps.supervisor.resolve(name)
            endpoint = await deps.supervisor.load(model.name)
        except TrioserveError as exc:
            return _text(str(exc), error=True)
        return _text(f"model {model.name!r} is {model.state.value} on port {endpoint.port}")

    @mcp.tool(
        description="Admin: stop a model (requests in flight finish first unless `force`).",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
        ),
    )
    async def unload_model(name: str, force: bool = False) -> CallToolResult:
        if not caller().admin:
            return _hidden("unload_model")
        try:
            model = deps.supervisor.resolve(name)
            await deps.supervisor.unload(model.name, force=force)
        except TrioserveError as exc:
            return _text(str(exc), error=True)
        return _text(f"model {model.name!r} is {model.state.value}")
