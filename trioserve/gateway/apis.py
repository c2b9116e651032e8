"""The APIs the relay speaks: one line per path, saying what kind of request it carries.

Every path is routed by the ``model`` its request names (in the JSON body, or a form field of a
multipart upload) and gets the same guarantees: identity, budgets, deadlines, a hang-up that
cancels the upstream request, usage. What differs between them is said here, not in the relay:

- ``light``: answered by the model server at once (token counts, templates, its own state):
  no generation slot, so never queued behind a generation; still started on demand and
  bounded by the deadlines.
- ``assemble``: a generating API whose non-streaming requests go upstream as streams and are
  assembled here (``assemble.py``): llama-server notices a hang-up only while it streams.
- ``dialect``: Anthropic's paths answer errors in Anthropic's shape and send ``event: ping``
  where OpenAI streams get SSE comments.
- ``upload``: a multipart/form-data body, streamed to the model (``upload.py``).
- ``usage``: which API's usage fields its answers carry (``usage.py``).
- ``passthrough``: ``/upstream/{model}/{path}``, any method: the model in the path, the request
  and the answer passed through as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from trioserve.gateway.assemble import Kind
from trioserve.gateway.usage import UsageKind

__all__ = ["API_PATHS", "PASSTHROUGH", "PASSTHROUGH_PREFIX", "Api", "Dialect"]

Dialect = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Api:
    light: bool = False
    assemble: Kind | None = None
    dialect: Dialect = "openai"
    upload: bool = False
    passthrough: bool = False
    usage: UsageKind = "chat"

    def __post_init__(self) -> None:
        # An assembled API's usage is its own kind's.
        if self.assemble is not None:
            object.__setattr__(self, "usage", self.assemble)


_GENERATING: Final = Api()
_LIGHT: Final = Api(light=True)
_UPLOAD: Final = Api(upload=True)

# POST paths, routed by the body's model.
API_PATHS: Final[dict[str, Api]] = {
    "/v1/chat/completions": Api(assemble="chat"),
    "/v1/completions": Api(assemble="completion"),
    "/v1/embeddings": _GENERATING,
    "/v1/responses": Api(assemble="responses"),
    "/v1/responses/input_tokens": _LIGHT,
    "/v1/messages": Api(assemble="messages", dialect="anthropic"),
    "/v1/messages/count_tokens": Api(light=True, dialect="anthropic"),
    # llama-server's three names for one endpoint.
    "/v1/rerank": _GENERATING,
    "/v1/reranking": _GENERATING,
    "/rerank": _GENERATING,
    "/v1/audio/transcriptions": _UPLOAD,
    "/v1/audio/translations": _UPLOAD,
    # A binary answer (audio), streamed through as it comes.
    "/v1/audio/speech": _GENERATING,
    # llama.cpp's own.
    "/completion": Api(usage="native"),
    "/infill": Api(usage="native"),
    "/tokenize": _LIGHT,
    "/detokenize": _LIGHT,
    "/apply-template": _LIGHT,
}

# Any method ``/upstream/{model}/{path}``: passed through to that model's server.
PASSTHROUGH_PREFIX: Final = "/upstream/"
PASSTHROUGH: Final = Api(light=True, passthrough=True)
