"""Headless Chromium (Debian's ``chromium``) driven by Playwright, for the status page's tests.

Playwright's own browser download cannot work on these machines: ``executable_path`` points it
at the system's Chromium (``scripts/ensure-command.sh chromium chromium`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

from tests.support.programs import required_program

__all__ = ["chromium"]


@contextmanager
def chromium(*args: str) -> Iterator[Browser]:
    """A headless Chromium for one test, closed (and reaped) afterwards."""
    executable = required_program("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(args))
        try:
            yield browser
        finally:
            browser.close()
