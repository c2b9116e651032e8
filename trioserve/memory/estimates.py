"""GGUF estimates for a config's "auto" models, made before their first start."""

from __future__ import annotations

from collections.abc import Container

from trioserve.config import Config, placeholder_values, render
from trioserve.memory.figures import MemoryBook, command_key

__all__ = ["Estimate", "apply_estimates", "estimate_models"]

# (bytes or None, the estimate's one-line account or why there is none, whether the GGUF
# could not be read), by command key.
Estimate = tuple[int | None, str, bool]


def estimate_models(config: Config, known: Container[str]) -> dict[str, Estimate]:
    """Blocking (it reads GGUF headers): the estimate of every "auto" model of ``config``
    whose command key is not in ``known``. A command with no .gguf, or an unreadable one, is
    noted: its memory is unknown until measured. Pure: the caller puts the result in its book
    (``apply_estimates``) on its own thread."""
    estimates: dict[str, Estimate] = {}
    for name, model in config.models.items():
        key = command_key(config, name, model)
        if model.declared_memory is not None or key in known or key in estimates:
            continue
        # The port is the one thing not known before a start; a model path never holds it.
        values = placeholder_values(config, name, "{port}")
        argv = [render(arg, values) for arg in model.cmd]
        if not any(".gguf" in arg for arg in argv):
            estimates[key] = (None, "its command names no .gguf to estimate from", False)
            continue
        # Imported only for a GGUF: the gguf library brings numpy, a tenth of a second of
        # every daemon start that serves none.
        from trioserve.memory.gguf_estimate import GgufEstimateError, estimate_command

        try:
            estimate = estimate_command(argv)
        except GgufEstimateError as exc:
            estimates[key] = (None, f"no estimate: {exc}", True)
            continue
        if estimate is None:
            estimates[key] = (None, "its command names no .gguf to estimate from", False)
        else:
            estimates[key] = (estimate.total, estimate.describe(), False)
    return estimates


def apply_estimates(book: MemoryBook, estimates: dict[str, Estimate]) -> None:
    for key, (size, note, failed) in estimates.items():
        figures = book.of(key)
        figures.estimate, figures.estimate_note, figures.estimate_failed = size, note, failed
