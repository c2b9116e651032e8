"""Memory placement on the status page, in a real browser (Debian's Chromium driven by
Playwright) against a daemon in a thread of the test's process: each model's figures, pinned and
preload, the memory budgets, and why a model waits, all live."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from tests.support.browser import chromium
from tests.support.config import daemon_config, echo_cmd
from tests.support.memory_wait import memory_daemon, model_waits


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def open_page(browser: Browser, url: str, errors: list[str], **context: Any) -> Page:
    """The status page, live (read-only: what it shows of memory needs no admin), in a new
    context with ``context``'s options; what it logs as errors goes to ``errors``."""
    page = browser.new_context(**context).new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/ui")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    return page


def test_the_page_shows_memory_budgets_and_why_a_model_waits(
    tmp_path: Path, threaded_daemon: Any, browser: Browser
) -> None:
    daemon = memory_daemon(tmp_path, threaded_daemon)
    errors: list[str] = []
    # At a phone's width: the long notes and the gauges wrap rather than widen the page.
    page = open_page(browser, daemon.url, errors, viewport={"width": 390, "height": 844})
    cpu = page.locator('#devices .device-row[data-device="cpu"]')
    figures = cpu.locator(".device-figures")
    # The pinned, preloaded p holds its declared 150 MiB.
    expect(figures).to_have_text("150.0 MiB used of 400.0 MiB · 250.0 MiB free")
    expect(cpu.locator("meter")).to_have_attribute("value", str(150 * 2**20))

    def model(name: str) -> Locator:
        return page.locator(f'#models tr[data-model="{name}"]')

    p, b = model("p"), model("b")
    expect(p.locator("td.name .marks")).to_have_text("pinned · preload")
    expect(p.locator("td.memory")).to_contain_text("cpu: est. 150.0 MiB · measured ")
    expect(model("u").locator("td.memory")).to_have_text("unknown")
    notes = page.locator("#model-notes li")
    expect(page.locator('#model-notes li[data-model="u"]')).to_have_text(
        "u: memory not yet known: counted as 0 until measured "
        "(its command names no .gguf to estimate from)"
    )
    with model_waits(daemon) as status:
        waiting = status["models"]["b"]["waiting_for"]
        assert waiting.startswith("waiting for memory: needs 150.0 MiB on cpu")
        note = page.locator('#model-notes li[data-model="b"][data-kind="waiting"]')
        expect(note).to_have_text(f"b: {waiting}")
        expect(figures).to_have_text("300.0 MiB used of 400.0 MiB · 100.0 MiB free")
        expect(b.locator("td.memory")).to_have_text("cpu: est. 150.0 MiB")
        expect(b.locator("td.state")).to_have_text("starting")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # Its request gone, b gives its place up: the page says so without a reload.
    expect(note).to_have_count(0)
    expect(notes).to_have_count(1)
    assert errors == []


def test_the_page_shows_no_memory_section_without_budgets(
    tmp_path: Path, threaded_daemon: Any, browser: Browser
) -> None:
    config, url = daemon_config(tmp_path / "c.toml", tmp_path / "state", {"m": {"cmd": echo_cmd()}})
    daemon = threaded_daemon(config, url)
    errors: list[str] = []
    page = open_page(browser, url, errors)
    row = page.locator('#models tr[data-model="m"]')
    expect(row.locator("td.memory")).to_have_text("unknown")
    daemon.load("m")
    # Measured once it ran, shown by the next sample.
    expect(row.locator("td.memory")).to_contain_text("cpu: measured ")
    expect(page.locator("#devices-section")).to_be_hidden()
    # Without budgets a memory not yet known places nothing: no note about it.
    expect(page.locator("#model-notes")).to_be_hidden()
    assert errors == []
