"""The quickstart in a real browser: JupyterLab and Notebook 7 on 127.0.0.1, headless Chromium driven by Playwright.

The notebook is opened and run the way a user runs it (Run All), then its
outputs are checked in the page itself: no cell failed, the user's own
training-loss plot is drawn (the dataset report left matplotlib alone), the
job monitor reached JOB_STATE_SUCCEEDED live with its loss-curve image, and
the chat panel, typed into at 30 ms a key and sent with Enter twice, sent
exactly what the box held, cleared it, and kept its height bounded. In the
light and the dark theme every text of the monitor and the panel reads on its
background (WCAG contrast measured on the rendered colours).

One Jupyter server serves both frontends, with a settings folder of its own, so
the theme switches never reach the user's settings. Screenshots are kept in
``test-artifacts/browser/`` (or ``$TUNING_MAGICS_ARTIFACTS``): ``<frontend>-<theme>-
{done,monitor,chat}.png``.
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

# Longer than _run_all's own wait, so a notebook that does not finish is reported with what it waits for.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

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
def server(tmp_path_factory):
    """A Jupyter server on 127.0.0.1 with JupyterLab and Notebook 7, serving a copy of notebooks/, with news,
    windowing and tokens off and a settings folder of its own."""
    pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns("output", "__pycache__"))
    settings = root / "settings"
    for plugin, values in {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
        # Every cell stays in the page, so its outputs can be looked at without scrolling them into view.
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/themes.jupyterlab-settings": {"theme": "JupyterLab Light"},
    }.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / plugin).write_text(json.dumps(values))
    port = _free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), TUNING_MAGICS_HOME=str(root / "home"),
               JUPYTER_RUNTIME_DIR=str(root / "runtime"))
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--IdentityProvider.token=", "--ServerApp.password=", "--LabApp.expose_app_in_browser=True",
               "--JupyterNotebookApp.expose_app_in_browser=True",
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


#: Where each frontend opens a notebook.
FRONTENDS = {"lab": "/lab/tree/", "notebook7": "/notebooks/"}
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}


def _theme(page, theme: str) -> None:
    """Switch the page's theme as the Settings menu does, and wait until the page wears it."""
    name = THEMES[theme]
    page.evaluate(f"() => window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{name}'}})")
    page.wait_for_function(f"() => document.body.dataset.jpThemeName === '{name}'", timeout=60_000)
    page.wait_for_timeout(500)  # the theme's stylesheet applies after the attribute


def _open(page, url: str, notebook: str, frontend: str = "lab") -> None:
    """Open ``notebook`` in ``frontend`` and wait until its kernel is idle."""
    page.goto(f"{url}{FRONTENDS[frontend]}{notebook}")
    page.wait_for_selector(".jp-Notebook", timeout=90_000)
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel?.status"
                           " === 'idle'", timeout=120_000)


def _run_all(page, root: Path, timeout: float = 540) -> list[dict]:
    """Run All in the open notebook, as the Run menu does, and wait until every cell ran; one failed cell, or the
    cells still pending at ``timeout`` with the local jobs' worker logs, fails the test."""
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    # Not awaited: the command's promise lasts as long as the cells run, and this loop reports what is pending.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
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
            pending = [c for c in state["cells"] if c["count"] is None]
            logs = "\n".join(f"{log}:\n{log.read_text()[-1500:]}" for log in sorted(root.glob("home/**/worker.log")))
            pytest.fail(f"the notebook did not finish in {timeout:g} s (kernel {state['kernel']}): cells "
                        f"{[c['index'] for c in pending]} pending; the first one's outputs so far: "
                        f"{json.dumps(pending[0]['outputs'])[-1500:] if pending else ''}\n{logs}")
        time.sleep(1)


def _shot(page, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


# The lowest WCAG contrast ratio between the text of the elements under ``selector`` and what is behind it:
# the colours as the page renders them, the background the nearest ancestor's that is not transparent.
_CONTRAST_JS = """(selector) => {
  const rgba = (c) => { const m = c.match(/[\\d.]+/g).map(Number); return [m[0], m[1], m[2], m.length > 3 ? m[3] : 1]; };
  const lum = ([r, g, b]) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                              return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const behind = (el) => { for (let e = el; e; e = e.parentElement) { const c = rgba(getComputedStyle(e).backgroundColor);
                            if (c[3] > 0.5) return c; } return [255, 255, 255, 1]; };
  let worst = {ratio: 99, text: '', color: '', background: ''};
  for (const root of document.querySelectorAll(selector)) {
    for (const el of [root, ...root.querySelectorAll('*')]) {
      // Words and numbers; a legend's swatch (a coloured glyph) is a colour to see, not a text to read.
      const own = [...el.childNodes].some(n => n.nodeType === 3 && /[A-Za-z0-9]/.test(n.textContent));
      const style = getComputedStyle(el);
      if (!own || style.visibility === 'hidden' || style.display === 'none' || !el.offsetParent) continue;
      const fg = rgba(style.color), bg = behind(el);
      const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
      const ratio = (a + 0.05) / (b + 0.05);
      if (ratio < worst.ratio) worst = {ratio, text: el.textContent.trim().slice(0, 60), color: style.color,
                                        background: 'rgb(' + bg.slice(0, 3).join(',') + ')'};
    }
  }
  return worst;
}"""


def _readable(page, selector: str, where: str) -> None:
    """Every text under ``selector`` reads on its background: contrast of at least 4.5 (WCAG AA)."""
    worst = page.evaluate(_CONTRAST_JS, selector)
    assert worst["ratio"] >= 4.5, f"{where}: {worst['text']!r} is {worst['color']} on {worst['background']} " \
                                  f"(contrast {worst['ratio']:.2f})"


def _check_monitor(page) -> None:
    """The quickstart's live monitor reached SUCCEEDED, with its loss-curve image and no button left to press."""
    page.wait_for_function("() => [...document.querySelectorAll('.tm-monitor')].some("
                           "m => m.innerText.includes('JOB_STATE_SUCCEEDED'))", timeout=180_000)
    monitor = page.locator(".tm-monitor").first
    assert monitor.locator("img").count() >= 1
    for button in (".tm-cancel", ".tm-stop-early"):  # an ended job's buttons are hidden, not greyed
        assert not monitor.locator(button).is_visible(), button
    _fits(monitor, "monitor")


def _chat_fast(page, panel, questions) -> None:
    """Type each question at 30 ms a key and press Enter at once, as a quick typist does."""
    box = panel.locator(".tm-input input")
    for n, question in enumerate(questions, start=1):
        box.click()
        box.press_sequentially(question, delay=30)
        box.press("Enter")
        page.wait_for_function(
            "([n]) => [...document.querySelectorAll('.tm-chat .tm-history .tm-msg-user')].length >= n", arg=[n],
            timeout=60_000)
        assert box.input_value() == "", "the box is cleared when Enter sends it"
        # The reply has ended: the live box (the reply streaming now) is hidden again.
        page.wait_for_function("() => !document.querySelector('.tm-chat .tm-live')?.offsetParent", timeout=180_000)
    sent = panel.locator(".tm-history .tm-msg-user").all_inner_texts()
    assert [t.strip().removeprefix("you").strip() for t in sent] == questions, sent  # each block: "you", the text


def _fits(view, what: str) -> None:
    """Nothing in ``view`` runs off to the side or is cut short ("Temperat...", "epoch 40 of 4")."""
    assert view.evaluate("v => v.scrollWidth <= v.clientWidth + 1"), f"the {what} scrolls sideways"
    cut = view.evaluate("""v => [...v.querySelectorAll('label, .widget-label, .widget-html-content')].filter(
        l => l.offsetParent && l.scrollWidth > l.clientWidth + 1).map(l => l.textContent)""")
    assert cut == [], f"cut off in the {what}: {cut}"


def _check_panel(page, panel) -> None:
    """Bounded: the conversation scrolls inside the panel, the input stays in view, nothing runs off to the side."""
    height = panel.evaluate("p => p.getBoundingClientRect().height")
    assert height < 900, f"the chat panel is {height:.0f} px tall"
    scroll = panel.locator(".tm-scroll")
    assert scroll.evaluate("s => getComputedStyle(s).overflowY") in ("auto", "scroll")
    _fits(panel, "chat panel")


def _quickstart_in(page, url: str, root: Path, frontend: str, first: str, then: str) -> None:
    """Run the quickstart in ``frontend`` in the ``first`` theme, chat with it, then look at it in ``then``."""
    _open(page, url, "notebooks/quickstart.ipynb", frontend)
    _theme(page, first)
    cells = _run_all(page, root)
    _shot(page, f"{frontend}-{first}-done")
    # The user's own matplotlib plot of the training loss is drawn in the page.
    plot_cells = [c for c in cells if ".plot(" in c["source"]]
    assert plot_cells, "the quickstart plots its training loss"
    assert any("image/png" in o.get("data", {}) for o in plot_cells[0]["outputs"]), plot_cells[0]["outputs"]
    assert "the tuned model knows the facts" in page.inner_text(".jp-Notebook")
    _check_monitor(page)
    # The chat panel starts with the system prompt the job was trained with.
    panel = page.locator(".tm-chat").first
    panel.scroll_into_view_if_needed()
    assert panel.locator(".tm-system textarea").input_value() == "Answer in one sentence."
    _chat_fast(page, panel, ["What is the capital of Zorvia?", "What is the capital of Quellan?"])
    history = panel.locator(".tm-history").inner_text()
    assert "Mellt" in history, history
    _check_panel(page, panel)
    for theme in (first, then):
        if theme != first:
            _theme(page, theme)
        _readable(page, ".tm-monitor", f"{frontend}, {theme} theme, monitor")
        _readable(page, ".tm-chat", f"{frontend}, {theme} theme, chat panel")
        page.locator(".tm-monitor").first.scroll_into_view_if_needed()
        _shot(page, f"{frontend}-{theme}-monitor", full_page=False)
        panel.scroll_into_view_if_needed()
        _shot(page, f"{frontend}-{theme}-chat", full_page=False)


@pytest.mark.parametrize("frontend, first, then", [("lab", "light", "dark"), ("notebook7", "dark", "light")])
def test_the_quickstart_in_the_browser_live_readable_in_both_themes_and_typed_into_fast(server, browser, frontend,
                                                                                       first, then):
    url, root = server
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    try:
        _quickstart_in(page, url, root, frontend, first, then)
    finally:
        page.close()


_ARENA_NOTEBOOK = {
    "cells": [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": (
            "import tuning_magics as tm\n"
            "rows = [{'prompt': f'What is {i} plus one?', 'completion': f'It is {i + 1}.'} for i in range(8)]\n"
            "job = tm.tune('local/tiny-qwen3', rows, epochs=6, evaluation={'data': rows, 'metrics': 'rouge_l',\n"
            "              'max_new_tokens': 16}, wait=True)\n"
            "job")},
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [], "source": (
            "class Echo:\n"
            "    def __init__(self, name): self.name = name\n"
            "    def chat(self, messages, **gen): return f'{self.name} <b>says</b> ' + messages[-1]['content']\n"
            "arena = tm.Arena(Echo('polite'), Echo('curt'), ['First question?', 'Second question?'], name='browser')\n"
            "arena")},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_the_arena_votes_by_button_and_the_monitor_marks_the_best_checkpoint_in_the_dark_theme(server, browser):
    url, root = server
    (root / "arena.ipynb").write_text(json.dumps(_ARENA_NOTEBOOK))
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    try:
        _open(page, url, "arena.ipynb")
        _theme(page, "dark")
        _run_all(page, root)
        # The monitor of a job scored during tuning: the task metric beside the loss, the best checkpoint marked.
        monitor = page.locator(".tm-monitor").first
        page.wait_for_function("() => document.querySelector('.tm-monitor')?.innerText.includes('rouge_l')",
                               timeout=60_000)
        labels = [t.replace("\xa0", " ") for t in monitor.locator(".tm-checkpoint select option").all_inner_texts()]
        assert any(label.endswith("★ best") for label in labels), labels
        assert "rouge_l on the evaluation data" in monitor.inner_text()
        _fits(monitor, "monitor")
        # The arena: two answers, escaped, and a vote per button; the next round shows at once.
        arena = page.locator(".tm-arena").first
        arena.scroll_into_view_if_needed()
        answers = arena.locator(".tm-arena-answer").all_inner_texts()
        assert len(answers) == 2 and all("<b>says</b>" in a for a in answers), answers
        _readable(page, ".tm-arena", "lab, dark theme, arena")
        _fits(arena, "arena")
        _shot(page, "lab-dark-arena", full_page=False)
        arena.locator(".tm-arena-vote").first.click()
        page.wait_for_function("() => document.querySelector('.tm-arena')?.innerText.includes('round 2')",
                               timeout=30_000)
        votes = (root / "home" / "arenas" / "browser.jsonl").read_text().splitlines()
        assert len(votes) == 1 and json.loads(votes[0])["vote"] == "A"  # on disk as soon as it was cast
        monitor.scroll_into_view_if_needed()
        _shot(page, "lab-dark-evaluated-monitor", full_page=False)
        # In the light theme, the last round by key, typed at a person's pace into the vote box.
        _theme(page, "light")
        _readable(page, ".tm-arena", "lab, light theme, arena")
        box = arena.locator(".tm-arena-keys input")
        box.click()
        box.press_sequentially("t", delay=120)
        box.press("Enter")
        page.wait_for_function("() => document.querySelector('.tm-arena')?.innerText.includes('2 of 2 rounds voted')",
                               timeout=30_000)
        votes = (root / "home" / "arenas" / "browser.jsonl").read_text().splitlines()
        assert [json.loads(v)["vote"] for v in votes] == ["A", "tie"]
        arena.scroll_into_view_if_needed()
        _shot(page, "lab-light-arena-ranked", full_page=False)
    finally:
        page.close()
