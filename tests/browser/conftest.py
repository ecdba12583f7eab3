"""Fixtures of the real-browser test: a JupyterLab server on the course notebooks, and Debian's Chromium.

- ``lab``: JupyterLab on 127.0.0.1, a free port and a random token, serving a temporary folder where every
  ``notebooks/NN_*.py`` is rebuilt into an ``.ipynb`` by jupytext (outputs saved into notebooks/ never matter),
  with its own settings folder (no cell windowing, no news pop-up) and workspaces folder. It is shut down after
  the session, failed checks included: the REST shutdown, then SIGTERM/SIGKILL of the server and every process it
  started (the kernels).
- ``browser``: the system's Chromium (``chromium`` on PATH, or ``OFFLOADKIT_CHROMIUM``) driven by playwright
  through ``executable_path``: ``playwright install`` (which downloads a browser) is never needed.

Without Chromium or playwright the tests skip with the reason, unless ``OFFLOADKIT_BROWSER_REQUIRED=1`` (what
``make browser-test`` sets) makes that a failure. ``make test`` deselects them (``-m "not browser"``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SCREENSHOTS = ROOT / "build" / "screenshots"
BIN = Path(sys.executable).parent
REQUIRED = os.environ.get("OFFLOADKIT_BROWSER_REQUIRED") == "1"
START_TIMEOUT_S = 90


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.browser)


def _missing(reason: str):
    if REQUIRED:
        pytest.fail(reason + " (OFFLOADKIT_BROWSER_REQUIRED=1)", pytrace=False)
    pytest.skip(reason)


def chromium_path() -> str | None:
    env = os.environ.get("OFFLOADKIT_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str  # http://127.0.0.1:PORT
    token: str
    root: Path  # the folder it serves
    log: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}.ipynb?token={self.token}&reset"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None


def _write_settings(settings: Path) -> None:
    """JupyterLab user settings: every cell in the DOM (no windowing), no news or update pop-ups."""
    files = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True},
    }
    for rel, value in files.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _stop(proc: subprocess.Popen, lab: Lab | None) -> None:
    """Shut the server and its kernels down, whatever state they are in."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the server already gone
        children = []
    if lab is not None and proc.poll() is None:
        with contextlib.suppress(OSError, urllib.error.URLError):
            lab.api("/api/shutdown", method="POST")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    for child in children:  # kernels (jupyter_client starts them in sessions of their own)
        with contextlib.suppress(Exception):
            child.kill()


@pytest.fixture(scope="session")
def lab():
    if not (BIN / "jupyter-lab").exists():
        _missing(f"JupyterLab is not installed in {BIN.parent} (make setup-browser)")
    tmp = Path(tempfile.mkdtemp(prefix="offloadkit-browser-"))
    root, settings, workspaces = tmp / "notebooks", tmp / "settings", tmp / "workspaces"
    root.mkdir()
    workspaces.mkdir()
    _write_settings(settings)
    for py in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")):
        subprocess.run([str(BIN / "jupytext"), "--quiet", "--to", "ipynb", "--output",
                        str(root / f"{py.stem}.ipynb"), str(py)], check=True)
    for extra in NOTEBOOKS.iterdir():  # data files next to the notebooks, if any
        if extra.is_file() and extra.suffix not in (".py", ".ipynb", ".toml"):
            shutil.copy(extra, root / extra.name)
    port, token = _free_port(), secrets.token_hex(24)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(workspaces),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PLOTLY_RENDERER", None)  # JupyterLab renders plotly's own mime type, offline
    cmd = [str(BIN / "jupyter-lab"), "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    log = tmp / "jupyterlab.log"
    lab_ = Lab(url=f"http://127.0.0.1:{port}", token=token, root=root, log=log)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-4000:]}", pytrace=False)
            try:
                lab_.api("/api/status", timeout=2)
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}",
                                pytrace=False)
                time.sleep(0.5)
        yield lab_
    finally:
        _stop(proc, lab_)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (make setup-browser)")
    exe = chromium_path()
    if exe is None:
        _missing("Chromium not found: install Debian's `chromium` (make setup-browser) or set OFFLOADKIT_CHROMIUM")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    pg = context.new_page()
    pg.console_errors = []  # type: ignore[attr-defined]
    pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
    pg.on("pageerror", lambda e: pg.console_errors.append(f"pageerror: {e}"))
    try:
        yield pg
    finally:
        context.close()
