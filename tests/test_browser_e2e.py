"""The widgets in real front-ends: JupyterLab 4 and Notebook 7 in headless Chromium (Playwright),
and a saved notebook converted to HTML by nbconvert.

One Jupyter server (JupyterLab; Notebook 7 is an extension of the same server) and one
Chromium serve the module. The JupyterLab test plays a user's session on micro models and
asserts what the page shows:

- `%train` blocking: the loss curve fills >= 50 % of its panel at step >= 10 (read from the
  plot's pixels), Stop works while the cell blocks, the final line names the saved step;
- `%train --background`: Checkpoint now and Stop;
- Kernel -> Interrupt: the one line and a short traceback, <= 15 lines in all;
- a kernel restart, `%runs` (tree and history browser): the slider by keyboard (Home, arrows,
  End = the last checkpoint), a sample, a branch whose form shows the inherited values, an
  extension, the comparison, a delete refused (branch point) and one confirmed;
- no button, label or tab title cut off; the saved notebook as nbconvert HTML shows the
  dashboard's static twin (the final line and a plot with a curve).

`MMNB_SCREENSHOTS=docs` writes docs/dashboard.png and docs/browser.png (else the test's temp
folder). Needs Debian's `chromium` (/usr/bin/chromium) and the pip packages `jupyterlab`,
`notebook` and `playwright` (Playwright's own browser download is never used).
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import MICRO, cli_args

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
WAIT = 60_000  # ms: a generous bound for anything on a busy two-core machine

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install jupyterlab)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)


# ---- the server, the browser, notebooks ----
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(cells: list[str]) -> str:
    return json.dumps(
        {
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
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_corpus):
    """A Jupyter server on 127.0.0.1 (JupyterLab and Notebook 7), no token, nothing from the
    user's config; its kernels train into one store with one thread."""
    tmp = tmp_path_factory.mktemp("jupyter")
    root, home = tmp / "root", tmp / "home"
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
                "JupyterNotebookApp": {"user_settings_dir": str(settings)},
            }
        )
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
        OMP_NUM_THREADS="1",
        MMNB_STORE=str(tmp / "store"),
    )
    env.pop("MMNB_PLOTS", None)  # the automatic choice: ipympl's canvas where it is installed
    port = _free_port()
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyterlab",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
            ],
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
                            "Jupyter did not start:\n" + log_path.read_text()
                        ) from None
                    time.sleep(0.3)
            flags = " ".join(cli_args(dict(MICRO, data=str(small_corpus))))
            yield {"url": url, "root": root, "store": tmp / "store", "micro": flags}
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture(scope="module")
def chromium():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(chromium, tmp_path):
    page = chromium.new_page(viewport={"width": 1440, "height": 1400})
    try:
        yield page
    finally:
        page.close()


def _on_failure(page, tmp_path: Path) -> None:
    # What the page showed is the only clue to a front-end failure: keep it.
    page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
    outputs = page.locator(".jp-OutputArea").all_inner_texts()
    print(f"page at failure: {tmp_path / 'failure.png'}; outputs: {outputs}")


def _shots(tmp_path: Path) -> Path:
    return DOCS if os.environ.get("MMNB_SCREENSHOTS") in ("1", "docs") else tmp_path


# ---- what the page shows ----
def curve_extent(png: bytes, grid: bool = True) -> float:
    """The fraction of the loss panel's width (top left of the dashboard's 2x2 grid, or the
    only panel when not `grid`) that the blue loss curve spans, from a screenshot's pixels."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    height, width = rgb.shape[:2]
    panel = rgb[: height // 2, : width // 2] if grid else rgb
    dark = panel.sum(axis=2) < 450  # the axes' black spines (grey where antialiased), text
    spines = np.flatnonzero(dark.sum(axis=0) > 0.3 * panel.shape[0])
    r, g, b = panel[..., 0], panel[..., 1], panel[..., 2]
    blue = (r < 110) & (g > 80) & (g < 160) & (b > 150)  # #1f77b4, not its faint raw copy
    columns = np.flatnonzero(blue.any(axis=0))
    if len(spines) < 2 or len(columns) < 2:
        return 0.0
    left, right = spines[0], spines[-1]
    columns = columns[(columns > left) & (columns < right)]
    return float(columns[-1] - columns[0]) / float(right - left) if len(columns) else 0.0


def assert_labels_fully_visible(page, root: str) -> int:
    """No visible button, label or tab title under `root` is cut off (an ellipsis or hidden
    overflow); returns how many were checked."""
    found = page.evaluate(
        """root => {
            const els = [...document.querySelectorAll(root)].flatMap(r => [...r.querySelectorAll(
                'button, .widget-label, .lm-TabBar-tabLabel, .widget-readout')]);
            const shown = els.filter(e => e.offsetParent !== null && e.clientWidth > 0);
            const cut = shown.filter(e => e.scrollWidth > e.clientWidth + 1
                || (e.innerText || '').includes('\u2026'));
            return [shown.length, cut.map(e => (e.innerText || e.title) + ' (' + e.scrollWidth
                + ' > ' + e.clientWidth + ')')];
        }""",
        root,
    )
    shown, cut = found
    assert not cut, f"cut-off labels: {cut}"
    return shown


def _cell(page, i: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def _run(page, i: int) -> None:
    """Select cell `i` (command mode) and press Shift+Enter, as a user does."""
    _cell(page, i).locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def _done(page, i: int) -> None:
    """Wait until cell `i` has run (its prompt shows a number instead of `*`)."""
    _cell(page, i).locator(".jp-InputPrompt", has_text=re.compile(r"\[\d+\]")).wait_for(
        timeout=WAIT
    )


def _wait_text(locator, pattern: str, timeout: int = WAIT) -> re.Match:
    """Wait until `locator`'s text matches `pattern`; the match."""
    deadline = time.monotonic() + timeout / 1000
    while True:
        text = locator.inner_text() if locator.count() else ""
        found = re.search(pattern, text)
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} never appeared; last text: {text!r}")
        time.sleep(0.1)


def _menu(page, *names: str) -> None:
    page.get_by_role("menuitem", name=names[0], exact=True).click()
    for name in names[1:]:
        page.get_by_role("menuitem", name=name).first.click()


def _open(page, url: str, path: str) -> None:
    page.goto(url + path, timeout=WAIT)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=WAIT)


def _kernel_idle(page) -> None:
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=WAIT)


def _plot_extent(dashboard) -> float:
    """The loss curve's extent in the dashboard's plot, once drawn (throttled redraws)."""
    plot = dashboard.locator(".mmnb-plot").first
    deadline = time.monotonic() + WAIT / 1000
    while True:
        extent = curve_extent(plot.screenshot())
        if extent > 0 or time.monotonic() > deadline:
            return extent
        time.sleep(0.3)


def _screenshot(page, element, path: Path, to=None) -> None:
    """`element` (down to the bottom of `to`, when given) as a picture for the docs: with the
    mouse away, so ipympl's toolbars have faded out."""
    page.mouse.move(0, 0)
    page.wait_for_function(
        "e => [...e.querySelectorAll('.jupyter-matplotlib-toolbar')]"
        ".every(t => getComputedStyle(t).opacity === '0')",
        arg=element.element_handle(),
        timeout=WAIT,
    )
    if to is None:
        element.screenshot(path=str(path))
        return
    element.evaluate("e => e.scrollIntoView()")
    top, bottom = element.bounding_box(), to.bounding_box()
    height = bottom["y"] + bottom["height"] - top["y"]
    page.screenshot(path=str(path), clip={**top, "height": height})


def _slider(browser, last: int):
    """The step slider's handle once it spans the selected run (0..`last`): choosing a run of
    another range makes a new slider, whose view replaces the old one a moment later."""
    handle = browser.locator(f'.mmnb-slider .noUi-handle[aria-valuemax="{last}.0"]')
    handle.wait_for(timeout=WAIT)
    return handle


def _scenario_cells(micro: str) -> list[str]:
    return [
        f'%load_ext mmnb\nMICRO = "{micro}"',
        "%train demo --max-steps 100000 --save-every 50 --no-sample {MICRO}",
        "%train bg --background --max-steps 100000 --save-every 0 {MICRO}",
        "%train long --max-steps 100000 --save-every 0 --no-sample {MICRO}",
        "%load_ext mmnb\n%runs",
    ]


# ---- JupyterLab: the whole session ----
def test_a_session_in_jupyterlab(server, page, tmp_path):
    url, root, store = server["url"], server["root"], server["store"]
    (root / "session.ipynb").write_text(_notebook(_scenario_cells(server["micro"])))
    shots = _shots(tmp_path)
    try:
        _open(page, url, "/lab/tree/session.ipynb")
        _kernel_idle(page)
        _run(page, 0)
        _done(page, 0)

        # -- a blocking %train: the curves fill their panels; Stop works while it blocks --
        _run(page, 1)
        dashboard = _cell(page, 1).locator(".mmnb-dashboard")
        line = dashboard.locator(".mmnb-state")
        _wait_text(line, r"step [1-9]\d+/100000")  # step >= 10
        assert _plot_extent(dashboard) >= 0.5  # not 10 of 100,000 steps: a 1-px curve
        # ipympl's canvas where it is installed: the toolbar (zoom, pan) is there
        if dashboard.locator(".jupyter-matplotlib").count():
            assert dashboard.locator(".jupyter-matplotlib-toolbar button").count() >= 4
        assert_labels_fully_visible(page, ".mmnb-dashboard")
        # past step 50, however slow the machine: the slider and the branch below use step 50
        _wait_text(line, r"step [1-9]\d{2,}/100000")
        dashboard.get_by_role("button", name="Stop").click()
        _done(page, 1)
        final = _wait_text(line, r"stopped at step (\d+) \(Stop\).*saved step (\d+)")
        assert final.group(1) == final.group(2)  # the final line names the saved step
        saved = int(final.group(1))
        assert store.joinpath("demo").is_dir()
        # the static twin (for nbconvert) stays hidden while the widget is on the page
        assert not _cell(page, 1).locator(".mmnb-static").first.is_visible()

        # -- in the background: Checkpoint now, then Stop --
        _run(page, 2)
        _done(page, 2)
        bg = _cell(page, 2).locator(".mmnb-dashboard")
        _wait_text(bg.locator(".mmnb-state"), r"step \d+/100000")
        bg.get_by_role("button", name="Checkpoint now").click()
        _wait_text(
            bg.locator(".mmnb-controls-note"), r"saved step \d+ \(checkpoint you requested\)"
        )
        bg.get_by_role("button", name="Stop").click()
        final = _wait_text(
            bg.locator(".mmnb-state"), r"stopped at step (\d+) \(Stop\).*saved step (\d+)"
        )
        assert final.group(1) == final.group(2)

        # -- Kernel -> Interrupt: one line and a short traceback --
        _run(page, 3)
        long = _cell(page, 3)
        _wait_text(long.locator(".mmnb-state"), r"step [1-9]\d*/100000")
        _menu(page, "Kernel", "Interrupt Kernel")
        _done(page, 3)
        shown = long.locator(".jp-RenderedText").all_inner_texts()
        lines = [ln for text in shown for ln in text.splitlines() if ln.strip()]
        assert lines and lines[0].startswith("interrupted: step "), lines
        assert "KeyboardInterrupt" in "\n".join(lines) and len(lines) <= 15, lines
        at = re.search(r"interrupted: step (\d+)", lines[0]).group(1)
        _wait_text(
            long.locator(".mmnb-state"), rf"interrupted: step {at} is saved.*saved step {at}"
        )

        # -- a restart, then %runs: the tree and the history browser, from the store alone --
        _menu(page, "Kernel", "Restart Kernel…")
        page.locator(".jp-Dialog .jp-mod-accept", has_text="Restart").click()
        _kernel_idle(page)
        _run(page, 4)
        _done(page, 4)
        tree = _cell(page, 4).locator(".jp-RenderedText").first.inner_text()
        for name in ("demo", "bg", "long"):
            assert re.search(rf"^{name}  \[\w+\]  loss ", tree, re.M), tree
        b = _cell(page, 4).locator(".mmnb-browser")
        meta = b.locator(".mmnb-meta")
        b.locator(".mmnb-runs option", has_text=re.compile(r"^demo\s")).click()
        _wait_text(meta, rf"run\s+demo\s+step\s+{saved}\b")

        # the slider by keyboard: Home, an arrow (the next checkpoint), End (the last one)
        handle = _slider(b, saved)
        handle.focus()
        handle.press("Home")
        _wait_text(meta, r"step\s+0\b")
        handle.press("ArrowRight")
        _wait_text(meta, r"step\s+50\b")
        handle.press("End")
        _wait_text(meta, rf"step\s+{saved}\b")
        assert handle.get_attribute("aria-valuenow").startswith(str(saved))

        # a sample of the selected checkpoint
        b.locator(".lm-TabBar-tab", has_text="Sample").click()
        b.get_by_role("button", name="Generate").click()
        _wait_text(b.locator(".mmnb-sample"), rf"demo step {saved}")
        assert_labels_fully_visible(page, ".mmnb-browser")

        # a branch from step 50: the form shows what it inherits
        handle.press("Home")
        handle.press("ArrowRight")
        _wait_text(meta, r"step\s+50\b")
        b.locator(".lm-TabBar-tab", has_text="Branch").click()
        form = b.locator(".widget-text")
        lr = form.filter(has=page.locator("label", has_text=re.compile("^lr$"))).locator("input")
        assert re.fullmatch(r"[\d.e-]+ \(same\)", lr.get_attribute("placeholder"))
        steps = form.filter(has=page.locator("label", has_text="max steps")).locator("input")
        assert steps.get_attribute("placeholder") == "100000 (same)"
        assert_labels_fully_visible(page, ".mmnb-browser")
        form.filter(has=page.locator("label", has_text=re.compile("^name$"))).locator("input").fill(
            "hot"
        )
        form.filter(has=page.locator("label", has_text=re.compile("^epochs$"))).locator(
            "input"
        ).fill("1")
        b.get_by_role("button", name="Branch from step 50").click()
        _wait_text(b.locator(".mmnb-note-branch"), "training hot in the background")
        job = b.locator(".mmnb-dashboard").last
        _wait_text(job.locator(".mmnb-state"), r"finished at step \d+")
        _wait_text(meta, r"run\s+hot\s+step\s+\d+")  # the browser follows the job
        assert lr.input_value() == ""  # submitted: the form is blank again

        # extend the finished branch by an epoch: past its decay, a new run hot-2ep
        b.locator(".lm-TabBar-tab", has_text="Extend").click()
        assert_labels_fully_visible(page, ".mmnb-browser")
        b.get_by_role("button", name="Extend hot").click()
        _wait_text(b.locator(".mmnb-note-extend"), "training hot-2ep in the background")
        job = b.locator(".mmnb-dashboard").last
        _wait_text(job.locator(".mmnb-state"), r"finished at step")
        # its dashboard (the whole history: a resume shows it) is the README's picture
        _screenshot(page, job, shots / "dashboard.png")

        # compare the three runs (log scale by default)
        b.locator(".lm-TabBar-tab", has_text="Compare").click()
        b.locator(".widget-select-multiple select").select_option(["demo", "hot", "hot-2ep"])
        compare = b.locator(".mmnb-compare .mmnb-plot")
        deadline = time.monotonic() + WAIT / 1000
        while curve_extent(compare.screenshot(), grid=False) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert (
            curve_extent(compare.screenshot(path=str(tmp_path / "compare.png")), grid=False) >= 0.5
        )
        assert b.get_by_role("checkbox", name="log scale").is_checked()
        assert_labels_fully_visible(page, ".mmnb-browser")
        _screenshot(page, b, shots / "browser.png", to=b.locator(".widget-tab").first)

        # delete: refused at a branch point, confirmed elsewhere
        b.locator(".mmnb-runs option", has_text=re.compile(r"^demo\s")).click()
        handle = _slider(b, saved)  # a new slider: demo's range
        handle.press("Home")
        handle.press("ArrowRight")
        _wait_text(meta, r"run\s+demo\s+step\s+50\b")
        b.locator(".lm-TabBar-tab", has_text="Delete").click()
        b.get_by_role("button", name="Delete step 50").click()
        _wait_text(b.locator(".mmnb-note-delete"), "branch point of hot; not deleted")
        handle.press("End")
        _wait_text(meta, rf"step\s+{saved}\b")
        b.get_by_role("button", name=f"Delete step {saved}").click()
        assert_labels_fully_visible(page, ".mmnb-browser")
        b.get_by_role("button", name=f"Confirm delete step {saved}").click()
        _wait_text(b.locator(".mmnb-note-delete"), f"deleted step {saved} of demo")
        assert not (store / "demo" / "ckpt" / f"{saved:08d}.h5").exists()

        # -- saved, converted by nbconvert: the dashboard's static twin shows the end --
        page.keyboard.press("Control+s")
        page.wait_for_function(
            "() => !document.querySelector('.jp-mod-current .jp-mod-dirty')", timeout=WAIT
        )
    except BaseException:
        _on_failure(page, tmp_path)
        raise
    for name in ("dashboard.png", "browser.png"):  # small enough for the repository
        assert (shots / name).stat().st_size < 200_000, name
    _check_nbconvert_html(page, root / "session.ipynb", saved, tmp_path)


def _check_nbconvert_html(page, notebook: Path, saved: int, tmp_path: Path) -> None:
    deadline = time.monotonic() + 30
    while "mmnb-dashboard-static" not in notebook.read_text():  # the save has landed
        assert time.monotonic() < deadline, "the notebook was not saved with its outputs"
        time.sleep(0.2)
    subprocess.run(
        [sys.executable, "-m", "nbconvert", "--to", "html", "--output-dir", str(tmp_path),
         str(notebook)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    # Offline, as a reader's browser may be: the CDN scripts nbconvert links fail at once.
    page.route(re.compile(r"^https?://"), lambda route: route.abort())
    page.goto((tmp_path / "session.html").as_uri(), wait_until="domcontentloaded")
    twin = page.locator(".mmnb-static").first  # the blocking demo run's dashboard
    twin.wait_for(timeout=WAIT)
    assert re.search(rf"stopped at step {saved} \(Stop\).*saved step {saved}", twin.inner_text())
    image = twin.locator("img")
    page.wait_for_function(
        "i => i.complete && i.naturalWidth > 100", arg=image.element_handle(), timeout=WAIT
    )
    assert curve_extent(image.screenshot()) >= 0.5  # a plot with its curve, not an empty box
    page.screenshot(path=str(tmp_path / "nbconvert.png"), full_page=True)


# ---- Notebook 7: a render and a click ----
def test_the_dashboard_and_browser_in_notebook_7(server, page, tmp_path):
    pytest.importorskip("notebook", reason="notebook 7 is not installed (pip install notebook)")
    url, root = server["url"], server["root"]
    cells = [
        f"%load_ext mmnb\n%train nb7 --max-steps 30 --save-every 10 --no-sample {server['micro']}",
        "%runs",
    ]
    (root / "nb7.ipynb").write_text(_notebook(cells))
    try:
        _open(page, url, "/notebooks/nb7.ipynb")
        # the kernel is up (the toolbar's execution indicator), then run the cells
        page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
            timeout=WAIT
        )
        _run(page, 0)
        _done(page, 0)
        dashboard = _cell(page, 0).locator(".mmnb-dashboard")
        _wait_text(dashboard.locator(".mmnb-state"), r"finished at step 30.*saved step 30")
        assert _plot_extent(dashboard) >= 0.5
        _run(page, 1)
        _done(page, 1)
        b = _cell(page, 1).locator(".mmnb-browser")
        meta = b.locator(".mmnb-meta")
        _wait_text(meta, r"run\s+nb7\s+step\s+30\b")
        b.locator(".lm-TabBar-tab", has_text="Delete").click()
        b.get_by_role("button", name="Delete step 30").click()  # the kernel answers
        b.get_by_role("button", name="Confirm delete step 30").wait_for(timeout=WAIT)
        assert_labels_fully_visible(page, ".mmnb-browser")
    except BaseException:
        _on_failure(page, tmp_path)
        raise
