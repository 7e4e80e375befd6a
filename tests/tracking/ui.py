"""MLflow's web UI rendered by a real headless Chromium: page URLs and the rendered page's text.

Chromium's one-shot `--screenshot` / `--dump-dom` modes are enough: `--virtual-time-budget` lets the page's own
clock run only while no network fetch is pending, so the single-page app has loaded its data and rendered before
the capture, whatever the machine's load (~2-3 s a page on 2 idle cores, up to ~20 s on busy ones)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser

# Debian's `chromium-headless-shell` is the lighter and faster package; the full browser works as well
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium-headless-shell"
TIMEOUT_S = 120.0  # wall clock for one page, beyond its virtual time budget


def find_browser() -> str | None:
    """The path of the first Chromium on PATH, or None."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def experiment_page(tracking_uri: str, experiment_id: str) -> str:
    """The experiment's runs table in the "Model training" UI.

    Without `workflowType`, MLflow 3.17 opens every experiment on its GenAI overview, whatever the experiment's
    `mlflow.experimentKind` tag; the UI's toggle lives in the browser's local storage, empty in a fresh profile."""
    return f"{tracking_uri}/#/experiments/{experiment_id}?workflowType=machine_learning"


def _chromium(url: str, *args: str, width: int, height: int, wait_s: float) -> str:
    """Run headless Chromium once on `url` with the extra `args`; its stdout. Stopped by its process group on a
    timeout, so its renderer and helper processes go too."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no Chromium found (looked for {', '.join(BROWSERS)}); install one: {INSTALL_HINT}")
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # needed as root; the page is our own local server
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        "--hide-scrollbars",
        f"--window-size={width},{height}",
        f"--virtual-time-budget={int(wait_s * 1000)}",
        *args,
        url,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S + wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"{browser} did not finish {url} within {TIMEOUT_S + wait_s:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"{browser} exited with {process.returncode} on {url}:\n{stderr[-2000:]}")
    return stdout


def rendered_dom(url: str, *, wait_s: float = 15.0) -> str:
    """The HTML of the page at `url` after its scripts have rendered it."""
    return _chromium(url, "--dump-dom", width=1600, height=1000, wait_s=wait_s)


class _TextParser(HTMLParser):
    SKIPPED = {"script", "style", "noscript", "template"}

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIPPED

    def handle_endtag(self, tag):
        self.skipping -= tag in self.SKIPPED and self.skipping > 0

    def handle_data(self, data):
        if not self.skipping and data.strip():
            self.parts.append(data.strip())


def rendered_text(url: str, *, wait_s: float = 15.0) -> str:
    """The text of the page at `url` after its scripts have rendered it: its text nodes, one a line, without
    scripts and styles."""
    parser = _TextParser()
    parser.feed(rendered_dom(url, wait_s=wait_s))
    return "\n".join(parser.parts)
