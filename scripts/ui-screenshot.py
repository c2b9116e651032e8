"""Make docs/ui.png: the status page with two models, one ready with traffic, one failed.

    .venv/bin/python scripts/ui-screenshot.py [--seconds 90]

Starts a daemon on a free port with a private state dir, sends varying traffic to the echo
model from a few threads, fails the other model's start, and photographs the page in Debian's
chromium (Playwright, ``executable_path``). Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
[server]
port = {port}
state_dir = "{state}"
[supervisor]
port_range = [21500, 21599]
max_start_failures = 1
[models.echo]
cmd = ["{{python}}", "-m", "trioserve.backends.echo", "--port", "{{port}}", "--token-delay", "0.02"]
max_concurrency = 3
[models.gemma-3-270m]
cmd = ["{{python}}", "-c", "import sys; print('llama_model_load: loading'); sys.exit('{oom}')"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def traffic(url: str, stop: threading.Event, phase: float) -> None:
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        while not stop.is_set():
            # Waves: each thread is busy only part of the time, so the chart moves.
            if (time.monotonic() + phase) % 30 < 15:
                text = "tell me about structured concurrency " * 4
                body = {"model": "echo", "messages": [{"role": "user", "content": text}]}
                client.post("/v1/chat/completions", json={**body, "max_tokens": 40})
            else:
                time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is missing: scripts/ensure-command.sh chromium chromium")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        config = Path(tmp) / "trioserve.toml"
        oom = "CUDA error: out of memory"
        config.write_text(CONFIG.format(port=port, state=Path(tmp) / "state", oom=oom))
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "trioserve"), "start", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stop = threading.Event()
        threads = [threading.Thread(target=traffic, args=(url, stop, i * 5.0)) for i in range(5)]
        try:
            for _ in range(100):
                try:
                    httpx.get(url + "/health", trust_env=False)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            # The local admin token: the page shows its actions only to an admin.
            token = (Path(tmp) / "state" / "admin.token").read_text().strip()
            httpx.post(
                url + "/admin/models/gemma-3-270m/load",
                headers={"authorization": f"Bearer {token}"},
                timeout=30,
                trust_env=False,
            )
            for thread in threads:
                thread.start()
            time.sleep(args.seconds)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(f"{url}/ui#token={token}")
                page.wait_for_selector('.chart[data-model="echo"]')
                page.locator('#models tr[data-model="gemma-3-270m"] td.last-error summary').click()
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            daemon.terminate()
            daemon.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
