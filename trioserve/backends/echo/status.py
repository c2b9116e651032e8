"""What llama-server says of itself, answered at once: ``/slots``, ``/slots/{id}``, ``/props``
and ``/metrics``. Pure: built from the options and the counters.

The echo has ``--parallel`` slots, as llama-server, but lets any number of generations run at
once: the first ones in flight are shown in the slots (``is_processing``) and in
``llamacpp:requests_processing``, the others as ``llamacpp:requests_deferred``, as if they
waited for a slot.
"""

from __future__ import annotations

from typing import Final

from trioserve.backends.echo.options import EchoOptions, EchoStats
from trioserve.backends.echo.request import RequestError
from trioserve.backends.echo.tokens import CHAT_TEMPLATE
from trioserve.backends.echo.wire import dumps
from trioserve.backends.echo.work import Answer

__all__ = ["metrics_answer", "props_answer", "slot_action_answer", "slots_answer"]

# The context of each slot, as llama-server reports it: what a small model's default would be.
_N_CTX: Final = 4096
_PROMETHEUS: Final = b"text/plain; version=0.0.4"


def _busy(options: EchoOptions, stats: EchoStats) -> int:
    return min(stats.in_flight, options.parallel)


def slots_answer(options: EchoOptions, stats: EchoStats, query: dict[str, str]) -> bytes:
    """``GET /slots``; with ``?fail_on_no_slot=1``, a 503 when every slot is busy."""
    busy = _busy(options, stats)
    if query.get("fail_on_no_slot") and busy == options.parallel:
        raise RequestError(503, "no slot available", "no_slot", "unavailable_error")
    return dumps(
        [
            {"id": slot, "n_ctx": _N_CTX, "speculative": False, "is_processing": slot < busy}
            for slot in range(options.parallel)
        ]
    )


def slot_action_answer(options: EchoOptions, slot: str, query: dict[str, str]) -> bytes:
    """``POST /slots/{id}?action=erase``: nothing is cached, so nothing is erased. ``save`` and
    ``restore`` need a ``--slot-save-path`` the echo does not have: 501, as llama-server."""
    if not slot.isdigit() or int(slot) >= options.parallel:
        raise RequestError(400, "Invalid slot ID", "invalid_slot")
    action = query.get("action")
    if action == "erase":
        return dumps({"id_slot": int(slot), "n_erased": 0})
    if action in ("save", "restore"):
        message = "This server does not support slots action. Start it with `--slot-save-path`"
        raise RequestError(501, message, "not_supported", "not_supported_error")
    raise RequestError(400, "Invalid action", "invalid_action")


def props_answer(options: EchoOptions) -> bytes:
    """``GET /props``."""
    params = {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "stream": False}
    return dumps(
        {
            "default_generation_settings": {"params": params, "n_ctx": _N_CTX},
            "total_slots": options.parallel,
            "model_alias": options.model_name,
            "model_path": f"echo/{options.model_name}.gguf",
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": True,
            "chat_template": CHAT_TEMPLATE,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "build_info": "echo (trioserve)",
            "is_sleeping": False,
        }
    )


def metrics_answer(options: EchoOptions, stats: EchoStats) -> Answer:
    """``GET /metrics``, in Prometheus' text format, with llama-server's names."""
    busy = _busy(options, stats)
    metrics = (
        ("prompt_tokens_total", "counter", "Number of prompt tokens processed.",
         stats.prompt_tokens),
        ("tokens_predicted_total", "counter", "Number of generation tokens processed.",
         stats.predicted_tokens),
        ("requests_processing", "gauge", "Number of requests processing.", busy),
        ("requests_deferred", "gauge", "Number of requests deferred.", stats.in_flight - busy),
    )  # fmt: skip
    text = "".join(
        f"# HELP llamacpp:{name} {help_text}\n# TYPE llamacpp:{name} {kind}\n"
        f"llamacpp:{name} {value}\n"
        for name, kind, help_text, value in metrics
    )
    return Answer(200, text.encode(), _PROMETHEUS)
