"""The scenario of scripts/gpu-check.sh, run against a trioserve daemon it has started: two
models on one GPU whose budget fits only one. Prints the placement, the memory NVML measured,
the wait and the eviction; exits 1 if trioserve did not keep the two apart. Standard library
only (it runs in the check's own venv, but needs nothing from it).

    python check.py --url http://127.0.0.1:PORT --key ADMIN_KEY --device cuda:0 A B
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

# States in which a model's process holds its memory for sure. ("starting" does not: a model
# waiting for memory is starting, with waiting_for set, and has no process yet.)
HOLDING = ("ready", "stopping")


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= unit:
            return f"{value / unit:.2f} {name}"
    return f"{value} B"


def per_device(figures: dict[str, int]) -> str:
    return ", ".join(f"{dev}={size(v)}" for dev, v in figures.items()) or "not known"


class Daemon:
    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.key = key

    def request(
        self, method: str, path: str, body: object = None, timeout: float = 300
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("authorization", f"Bearer {self.key}")
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text

    def status(self) -> dict[str, Any]:
        status, answer = self.request("GET", "/admin/status", timeout=10)
        if status != 200:
            raise SystemExit(f"GET /admin/status answered {status}: {answer}")
        return dict(answer)

    def chat(self, model: str, text: str) -> tuple[int, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
        return self.request("POST", "/v1/chat/completions", body)


class Events:
    """``/admin/events`` read in a thread: printed as they come, kept for the verdict."""

    def __init__(self, daemon: Daemon, started: float) -> None:
        self.daemon = daemon
        self.started = started
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(10):
            raise SystemExit("GET /admin/events did not open within 10 s")

    def _read(self) -> None:
        request = urllib.request.Request(self.daemon.url + "/admin/events")
        request.add_header("authorization", f"Bearer {self.daemon.key}")
        with urllib.request.urlopen(request) as response:
            self.ready.set()
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: "):
                    continue
                event = json.loads(line.removeprefix("data: "))
                with self.lock:
                    self.seen.append(event)
                reason = f" ({event['reason']})" if event.get("reason") else ""
                print(
                    f"  [{time.monotonic() - self.started:6.1f}s] event  {event['model']}: "
                    f"{event['from']} -> {event['to']}{reason}",
                    flush=True,
                )

    def overlaps(self, models: list[str]) -> list[str]:
        """Moments when more than one of ``models`` was ready or stopping."""
        state = dict.fromkeys(models, "stopped")
        found = []
        with self.lock:
            for event in self.seen:
                if event["model"] in state:
                    state[event["model"]] = event["to"]
                    holding = [m for m in models if state[m] in HOLDING]
                    if len(holding) > 1:
                        found.append(f"{' and '.join(holding)} held memory at once: {event}")
        return found

    def moved(self, model: str, to: str) -> bool:
        with self.lock:
            return any(e["model"] == model and e["to"] == to for e in self.seen)


def show(status: dict[str, Any], models: list[str], title: str) -> None:
    print(f"\n== {title}")
    devices = status.get("devices", {})
    if not devices:
        print("  devices: {} (no budgets: is this trioserve older than issue 25?)")
    for device, figures in devices.items():
        print(
            f"  device {device}: budget {size(figures.get('budget'))}, "
            f"used {size(figures.get('used'))}, free {size(figures.get('free'))}"
        )
    for name in models:
        model = status["models"].get(name, {})
        memory = model.get("memory", {})
        print(
            f"  model {name}: {model.get('state')}, pid {model.get('pid')}, "
            f"devices {model.get('devices')}"
        )
        print(f"      estimated  {per_device(memory.get('estimated', {}))}")
        print(f"      measured   {per_device(memory.get('measured', {}))}")
        print(f"      waiting_for {model.get('waiting_for')}")
        for warning in model.get("warnings", []):
            print(f"      warning    {warning}")


def wait_measured(daemon: Daemon, model: str, device: str, within: float) -> dict[str, Any]:
    """The status once ``model``'s measured memory on ``device`` is known (or the last one)."""
    deadline = time.monotonic() + within
    while True:
        status = daemon.status()
        measured = status["models"][model].get("memory", {}).get("measured", {})
        if device in measured or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True, help="an admin key of the daemon")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--mib", type=int, required=True, help="what each holder allocates")
    parser.add_argument("--busy", type=float, default=5.0, help="seconds the first one is busy")
    parser.add_argument("models", nargs=2)
    args = parser.parse_args()
    daemon = Daemon(args.url, args.key)
    first, second = models = [str(name) for name in args.models]
    failures: list[str] = []
    started = time.monotonic()
    show(daemon.status(), models, "placement before any request")
    events = Events(daemon, started)

    print(f"\n== {first} requested (its start takes a CUDA context and {args.mib} MiB)")
    code, answer = daemon.chat(first, "hello")
    print(f"  {code}: {json.dumps(answer)[:300]}")
    if code != 200:
        failures.append(f"{first} answered {code}")
    print("  (up to 30 s for a measurement: the daemon measures a ready model every 10 s)")
    status = wait_measured(daemon, first, args.device, within=30)
    show(status, models, f"{first} ready; NVML's figure in 'measured'")
    measured = status["models"][first].get("memory", {}).get("measured", {}).get(args.device)
    if measured is None:
        failures.append(
            f"no NVML measurement of {first} on {args.device} within 30 s (is NVML, "
            "libnvidia-ml.so.1, there? the daemon's log says why not)"
        )
    elif measured < args.mib * 2**20:
        failures.append(f"{first} measured {size(measured)} on {args.device}, < {args.mib} MiB")

    print(
        f"\n== {first} busy for {args.busy:g} s while {second} is requested: {second} waits, "
        f"then {first} is stopped and {second} starts"
    )
    busy_answers: list[tuple[int, Any]] = []
    busy = threading.Thread(
        target=lambda: busy_answers.append(daemon.chat(first, f"sleep {args.busy}")), daemon=True
    )
    busy.start()
    time.sleep(0.5)  # the busy request reaches the model first
    answers: list[tuple[int, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(daemon.chat(second, "hello")))
    waiting.start()
    last_reason, waited = None, False
    while waiting.is_alive():
        polled = daemon.status()["models"]
        reason = polled[second].get("waiting_for")
        if reason != last_reason:
            print(f"  [{time.monotonic() - started:6.1f}s] {second} waiting_for: {reason}")
            last_reason = reason
            waited = waited or reason is not None
        # A process each at once: the memory of both on the GPU.
        pids = {name: polled[name].get("pid") for name in models}
        if all(pid is not None for pid in pids.values()):
            failures.append(f"both models had a process at once: {pids}")
        waiting.join(0.25)
    busy.join(60)
    if not busy_answers or busy_answers[0][0] != 200:
        failures.append(f"{first}'s request in flight did not finish with 200: {busy_answers}")
    if not waited:
        failures.append(f"{second} never waited for memory while {first} was busy")
    code, answer = answers[0]
    print(f"  {second} answered {code}: {json.dumps(answer)[:300]}")
    if code != 200:
        failures.append(f"{second} answered {code}")
    status = wait_measured(daemon, second, args.device, within=30)
    show(status, models, f"after the swap: {first} evicted, {second} placed")
    time.sleep(0.5)  # the last events reach the stream

    if not events.moved(first, "stopped"):
        failures.append(f"{first} was never stopped to make room for {second}")
    failures += events.overlaps(models)
    print()
    if failures:
        for failure in failures:
            print(f"FAIL: {failure}")
        return 1
    print(
        f"PASS: {first} and {second} never held {args.device} at once; "
        "NVML measured each on its device"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
