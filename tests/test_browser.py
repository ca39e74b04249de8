"""The quickstart in a real browser: JupyterLab on 127.0.0.1, headless Chromium driven by Playwright.

The notebook is opened and run cell by cell the way a user runs it (Run All),
then its outputs are checked in the page itself: no cell failed, the user's
own training-loss plot is drawn (the dataset report left matplotlib alone),
the job monitor reached JOB_STATE_SUCCEEDED with its loss-curve image, and a
chat-panel message got a streamed reply (where the quickstart has them).
Screenshots are kept in ``test-artifacts/browser/`` (or ``$TUNING_MAGICS_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _free_port, _stop, _wait_until_up

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("TUNING_MAGICS_ARTIFACTS", REPO / "test-artifacts")) / "browser"
#: The Chromium flags for a machine with no display, no GPU and no network but loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-dev-shm-usage"]


def _chromium() -> str:
    """The system Chromium (Playwright's own download cannot run here); installed with apt where missing."""
    if not Path(CHROMIUM).exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, capture_output=True, timeout=600)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing and could not be installed: apt-get install chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a copy of notebooks/, with news, windowing and tokens off."""
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("output", "__pycache__"))
    settings = root / "settings"
    for plugin, values in {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
        # Every cell stays in the page, so its outputs can be looked at without scrolling them into view.
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / plugin).write_text(json.dumps(values))
    port = _free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), TUNING_MAGICS_HOME=str(root / "home"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--IdentityProvider.token=", "--ServerApp.password=", "--LabApp.expose_app_in_browser=True",
               f"--ServerApp.root_dir={root}", f"--LabApp.workspaces_dir={root / 'workspaces'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not _wait_until_up(proc, f"{url}/lab", timeout=90):
            pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}")
        yield url, root
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# The notebook as JupyterLab's model holds it: each code cell's execution count and outputs.
_CELLS_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = panel.content.model.cells;
  const out = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    const outputs = [];
    for (let j = 0; j < cell.outputs.length; j++) outputs.push(cell.outputs.get(j).toJSON());
    out.push({index: i, count: cell.executionCount, source: cell.sharedModel.getSource(), outputs});
  }
  return {cells: out, kernel: panel.sessionContext.session?.kernel?.status ?? 'none'};
}"""


def _run_all(page, url: str, notebook: str, timeout: float = 600) -> list[dict]:
    page.goto(f"{url}/lab/tree/{notebook}")
    page.wait_for_selector(".jp-Notebook", timeout=90_000)
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status"
                           " === 'idle'", timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    deadline = time.monotonic() + timeout
    while True:
        state = page.evaluate(_CELLS_JS)
        done = all(c["count"] is not None for c in state["cells"]) and state["kernel"] == "idle"
        failed = [c for c in state["cells"] if any(o.get("output_type") == "error" for o in c["outputs"])]
        if failed:
            errors = [o for o in failed[0]["outputs"] if o.get("output_type") == "error"]
            pytest.fail(f"cell {failed[0]['index']} failed in the browser: {errors[0].get('ename')}: "
                        f"{errors[0].get('evalue')}\n{failed[0]['source'][:300]}")
        if done:
            return state["cells"]
        if time.monotonic() > deadline:
            pytest.fail(f"the notebook did not finish in {timeout:g} s: "
                        f"{[c['index'] for c in state['cells'] if c['count'] is None]} still pending")
        time.sleep(1)


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_the_quickstart_runs_in_jupyterlab_with_its_plots_monitor_and_chat(lab, browser):
    url, _root = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        cells = _run_all(page, url, "notebooks/quickstart.ipynb")
        _shot(page, "quickstart-done")
        # The user's own matplotlib plot of the training loss is drawn in the page.
        plot_cells = [c for c in cells if ".plot(" in c["source"]]
        assert plot_cells, "the quickstart plots its training loss"
        assert any("image/png" in o.get("data", {}) for o in plot_cells[0]["outputs"]), plot_cells[0]["outputs"]
        images = page.evaluate(f"""() => window.jupyterapp.shell.currentWidget.content.widgets[
            {plot_cells[0]['index']}].node.querySelectorAll('.jp-OutputArea-output img').length""")
        assert images >= 1
        text = page.inner_text(".jp-Notebook")
        assert "the tuned model knows the facts" in text
        # The live monitor of the job, where the quickstart shows one: it reached SUCCEEDED with its loss image.
        monitors = page.locator(".tm-monitor")
        if monitors.count():
            page.wait_for_function("() => [...document.querySelectorAll('.tm-monitor')].some("
                                   "m => m.innerText.includes('JOB_STATE_SUCCEEDED'))", timeout=120_000)
            assert monitors.first.locator("img").count() >= 1
            monitors.first.scroll_into_view_if_needed()
            _shot(page, "quickstart-monitor")
        # The chat panel, where the quickstart opens one: a message gets a streamed reply.
        panels = page.locator(".tm-chat")
        if panels.count():
            panel = panels.first
            panel.scroll_into_view_if_needed()
            panel.locator("textarea").first.fill("Answer in one sentence.")  # the system prompt it was tuned with
            panel.locator("input[type=text]").last.fill("What is the capital of Zorvia?")
            panel.get_by_role("button", name="Send").click()
            # The reply streams into the panel's live view, then moves into the history.
            page.wait_for_function("() => [...document.querySelectorAll('.tm-chat .tm-history')].some("
                                   "h => h.innerText.includes('Mellt'))", timeout=180_000)
            history = panel.locator(".tm-history").inner_text()
            assert "What is the capital of Zorvia?" in history and "Mellt" in history
            _shot(page, "quickstart-chat")
    finally:
        page.close()
