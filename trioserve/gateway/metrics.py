"""Prometheus metrics, on a registry of the app's own (no global registry)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from trioserve.supervision.model import ModelStatus

__all__ = ["Metrics"]

_STATES = ("stopped", "starting", "ready", "stopping", "failed")


class _ModelCollector(Collector):
    """In-flight, queued and state gauges, read from the supervisor at scrape time, so the hot
    path never updates a gauge."""

    def __init__(self, status: Callable[[], Mapping[str, ModelStatus]]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        in_flight = GaugeMetricFamily(
            "trioserve_in_flight", "Requests forwarded to the model now", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "trioserve_queued", "Requests waiting for a slot of the model", labels=["model"]
        )
        state = GaugeMetricFamily(
            "trioserve_model_state", "1 for the model's current state", labels=["model", "state"]
        )
        memory = GaugeMetricFamily(
            "trioserve_model_memory_bytes",
            "The model's memory per device: estimated before a start (declared or from its "
            "GGUF), measured once it ran",
            labels=["model", "device", "kind"],
        )
        waiting = GaugeMetricFamily(
            "trioserve_model_waiting_for_memory",
            "1 while the model's start waits for memory on its devices",
            labels=["model"],
        )
        for name, info in status.items():
            in_flight.add_metric([name], info.in_flight)
            queued.add_metric([name], info.queued)
            for each in _STATES:
                state.add_metric([name, each], 1.0 if info.state.value == each else 0.0)
            for kind in ("estimated", "measured"):
                for device, size in info.memory.get(kind, {}).items():
                    memory.add_metric([name, device, kind], size)
            waiting.add_metric([name], 1.0 if info.waiting_for_memory else 0.0)
        yield in_flight
        yield queued
        yield state
        yield memory
        yield waiting


class _DeviceCollector(Collector):
    """Each budgeted device's memory (bytes), read from the supervisor at scrape time."""

    def __init__(self, devices: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self._devices()
        for key, documentation in (
            ("budget", "The device's memory budget ([supervisor] memory)"),
            ("used", "What placement counts on the device for the models holding memory"),
            ("free", "The budget less what is used (negative: over budget)"),
        ):
            family = GaugeMetricFamily(
                f"trioserve_device_memory_{key}_bytes", documentation, labels=["device"]
            )
            for device, figures in devices.items():
                family.add_metric([device], figures[key])
            yield family


class _McpCollector(Collector):
    """The MCP endpoint's gauges, read from it at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        yield GaugeMetricFamily(
            "trioserve_mcp_sessions", "Open MCP sessions", value=counts["sessions"]
        )
        yield GaugeMetricFamily(
            "trioserve_mcp_calls_in_flight",
            "MCP tool calls running now",
            value=counts["calls_in_flight"],
        )


class Metrics:
    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, labels, registry=registry)

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, documentation, ["model"], registry=registry, buckets=buckets)

        self.requests = counter(
            "trioserve_requests", "Relayed requests by model and HTTP status", "model", "status"
        )
        self.duration = histogram(
            "trioserve_request_duration_seconds",
            "Whole request duration",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.ttfb = histogram(
            "trioserve_time_to_first_byte_seconds",
            "From request arrival to the first upstream byte (queue and start included)",
            (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180),
        )
        self.errors = counter(
            "trioserve_errors", "Error answers by model and code", "model", "code"
        )
        self.starts = counter("trioserve_model_starts", "Model processes spawned", "model")
        self.failures = counter(
            "trioserve_model_failures", "Failed starts, crashes and hangs", "model"
        )
        self.upstream_cancellations = counter(
            "trioserve_upstream_cancellations",
            "Upstream requests aborted because the client left or a deadline passed",
            "model",
        )

    def watch_models(self, status: Callable[[], Mapping[str, ModelStatus]]) -> None:
        self.registry.register(_ModelCollector(status))

    def watch_devices(self, devices: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        """``devices()``: ``{DEV: {"budget", "used", "free"}}`` in bytes, as the status has it."""
        self.registry.register(_DeviceCollector(devices))

    def watch_mcp(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """``counts()``: ``{"sessions", "calls_in_flight"}`` of the MCP endpoint."""
        self.registry.register(_McpCollector(counts))

    def finished(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, str(status)).inc()
        self.duration.labels(model).observe(seconds)

    def first_byte(self, model: str, seconds: float) -> None:
        self.ttfb.labels(model).observe(seconds)

    def error(self, model: str, code: str) -> None:
        self.errors.labels(model, code).inc()

    def cancelled(self, model: str) -> None:
        self.upstream_cancellations.labels(model).inc()

    def spawned(self, model: str) -> None:
        self.starts.labels(model).inc()

    def failed(self, model: str, reason: str) -> None:
        self.failures.labels(model).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
