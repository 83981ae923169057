"""The widgets in a real front-end: JupyterLab 4 in headless Chromium, driven by Playwright.

The test writes a notebook that trains a micro run with a `Dashboard` and shows
`mmnb.browse(store)`, starts JupyterLab on 127.0.0.1 with a token-less private config, runs
all cells, and checks that the dashboard's plot is a real image and that moving the step
slider changes the step the browser shows. `MMNB_SCREENSHOTS=1` also saves the two PNGs the
README uses into docs/ (otherwise they go to the test's temp folder).

Needs: Debian's `chromium` (/usr/bin/chromium) and the pip packages `jupyterlab` and
`playwright` (Playwright's own browser download is never used).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install jupyterlab)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)


def _cells(store: Path, micro: dict) -> list[str]:
    return [
        # One thread: the kernel shares two cores with the server and the browser.
        "import os\nos.environ['OMP_NUM_THREADS'] = '1'\nimport torch\ntorch.set_num_threads(1)\n"
        "import mmnb\nfrom mmnb.widgets import Dashboard\n"
        f"store = mmnb.Store({str(store)!r})\nMICRO = {micro!r}",
        "dash = Dashboard()\ndisplay(dash)\n"
        "run = mmnb.train('demo', store=store, listeners=[dash], max_steps=120, save_every=10,"
        " **MICRO)\ndash.attach(run)\n"
        "mmnb.branch('demo', 60, 'demo-b', store=store, lr=1e-3, max_steps=100)",
        "browser = mmnb.browse(store)\nbrowser.compare.select(['demo', 'demo-b'])\nbrowser",
    ]


def _notebook(cells: list[str]) -> dict:
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell{i}",
                "metadata": {},
                "outputs": [],
                "source": source,
            }
            for i, source in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with no token and nothing from the user's config."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    config, settings = home / "config", home / "settings"
    for plugin, values in {
        # No news or update checks: the machine may be offline, and toasts cover the page.
        "apputils-extension/notification": {
            "fetchNews": "false",
            "checkForUpdates": False,
            "doNotDisturbMode": True,
        },
        # Start the notebook's kernel without the "Select Kernel" dialog.
        "notebook-extension/tracker": {"autoStartDefaultKernel": True},
    }.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    config.mkdir()
    (config / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "IdentityProvider": {"token": ""},
                "PasswordIdentityProvider": {"hashed_password": ""},
                "ServerApp": {
                    "disable_check_xsrf": True,
                    "root_dir": str(root),
                    "allow_root": True,  # CI containers run as root
                    "jpserver_extensions": {
                        "jupyter_lsp": False,
                        "jupyter_server_terminals": False,
                    },
                },
                "LabApp": {
                    "news_url": None,
                    "user_settings_dir": str(settings),
                    "extension_manager": "readonly",  # never asks PyPI
                },
            }
        )
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        OMP_NUM_THREADS="1",
    )
    port = _free_port()
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()
                    ) from None
                time.sleep(0.3)
        yield url, root
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_dashboard_and_browser_render_in_jupyterlab(lab, tmp_path, micro):
    url, root = lab
    notebook = root / "widgets.ipynb"
    notebook.write_text(json.dumps(_notebook(_cells(tmp_path / "store", micro))))
    shots = DOCS if os.environ.get("MMNB_SCREENSHOTS") == "1" else tmp_path
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1500})
            page.goto(f"{url}/lab/tree/widgets.ipynb", timeout=60_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            # Run All only once the kernel is up (the status bar says so).
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=60_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            page.locator(".jp-InputPrompt", has_text="[1]").first.wait_for(timeout=60_000)

            # The dashboard draws its plot into an <img> while the cell trains.
            plot = page.locator(".mmnb-dashboard img").first
            plot.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('.mmnb-dashboard img');"
                " return i && i.complete && i.naturalWidth > 100 && i.naturalHeight > 50; }",
                timeout=60_000,
            )
            meta = page.locator(".mmnb-browser .mmnb-meta")
            meta.wait_for(timeout=90_000)
            page.wait_for_function(
                "() => { const m = document.querySelector('.mmnb-browser .mmnb-meta');"
                " return m && /step\\s*100/.test(m.innerText); }",  # demo-b, the newest run
                timeout=60_000,
            )
            dashboard = page.locator(".mmnb-dashboard").first
            assert "step 120/120" in dashboard.inner_text()
            dashboard.screenshot(path=str(shots / "dashboard.png"))

            # Keyboard on the slider handle: Home is the first checkpoint (step 0).
            handle = page.locator(".mmnb-browser .mmnb-slider .noUi-handle").first
            handle.focus()
            handle.press("Home")
            page.wait_for_function(
                "() => /step\\s*0\\b/.test("
                "document.querySelector('.mmnb-browser .mmnb-meta').innerText)",
                timeout=30_000,
            )
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            page.wait_for_function(
                "() => /step\\s*20\\b/.test("
                "document.querySelector('.mmnb-browser .mmnb-meta').innerText)",
                timeout=30_000,
            )
            image = page.locator(".mmnb-browser img").first
            assert image.evaluate("i => i.naturalWidth") > 100
            # Show the comparison of the run and its branch (selected by the notebook).
            page.locator(".mmnb-browser .lm-TabBar-tab", has_text="Compare").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('.mmnb-browser img')]"
                ".filter(i => i.naturalWidth > 100).length >= 2",
                timeout=30_000,
            )
            page.locator(".mmnb-browser").first.screenshot(path=str(shots / "browser.png"))
        except Exception:
            # What the page showed is the only clue to a front-end failure: keep it.
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            outputs = page.locator(".jp-OutputArea").all_inner_texts()
            print(f"page at failure: {tmp_path / 'failure.png'}; outputs: {outputs}")
            raise
        finally:
            browser.close()
    for name in ("dashboard.png", "browser.png"):
        assert (shots / name).stat().st_size < 200_000
