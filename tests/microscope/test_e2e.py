"""End to end in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Starts the page on 127.0.0.1 on a free port (in this process, so the expected answer is
computed by the same models), uploads an image, asks a question, waits for the result and
checks the answer, the overlays, that every request the page made went to 127.0.0.1 (no
fonts, scripts or analytics from the internet) and that bad uploads give a message, not a
stack trace. Saves a screenshot under pytest's tmp_path; to refresh the committed one, run
``ARR_COC_SCREENSHOT=experiments/results/microscope.png pytest tests/microscope/test_e2e.py``
(so that a plain test run leaves the tree clean).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.timeout(300),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = {"127.0.0.1", "localhost", "::1", None}
SERVER_LOOKUPS: list[str] = []  # every host name the server process looked up or connected to


@pytest.fixture(scope="module")
def server():
    """The app in this process; records the host of every DNS lookup / connect the process makes."""
    from arr_coc.microscope import core
    from arr_coc.microscope.app import build_app, launch

    mp = pytest.MonkeyPatch()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        SERVER_LOOKUPS.append(host if isinstance(host, str) or host is None else host.decode())
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple):
            SERVER_LOOKUPS.append(address[0])
        return real_connect(self, address)

    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    mp.setattr(socket.socket, "connect", connect)
    models = core.load_models()
    demo = build_app(models)
    port = _free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield models, f"http://127.0.0.1:{port}/"
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url, wait_until="load", timeout=90_000)
    page.wait_for_selector("#question textarea", timeout=60_000)
    return page, requests


def test_question_gives_answer_and_overlays(server, browser, tmp_path):
    from arr_coc.microscope import core
    from arr_coc.microscope.app import DEFAULT_ALLOCATORS

    models, url = server
    ex = models.task.example(5)
    img = (ex.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path / "scene.png"
    Image.fromarray(img).save(path)
    expected = core.analyse(models, core.load_image(path, image_size=models.image_size), ex.question, ["arr_coc"], 16)
    answer = expected.runs["arr_coc"].answer

    page, requests = _open(browser, url)
    page.set_input_files("#upload input[type=file]", str(path))
    page.wait_for_selector("#preview img", timeout=60_000)
    page.fill("#question textarea", ex.question)
    page.press("#question textarea", "Enter")
    n = len(DEFAULT_ALLOCATORS)
    page.wait_for_function(f"document.querySelectorAll('#overlays img').length >= {n}", timeout=120_000)
    page.wait_for_function("document.querySelectorAll('#maps img').length >= 3", timeout=60_000)
    # the per-allocator table (Gradio 6 renders its cells as lines of text): name, weights, kept, levels, answer, ...
    lines = [ln.strip() for ln in page.inner_text("#summary").splitlines() if ln.strip()]
    for name in DEFAULT_ALLOCATORS:
        assert name in lines, (name, lines)
    i = lines.index("arr_coc")
    assert lines[i + 2] == "16" and lines[i + 4] == answer, (answer, lines[i : i + 9])
    # the overlay images really decoded (naturalWidth > 0) at the upscaled size
    page.wait_for_function(
        "[...document.querySelectorAll('#overlays img')].every(e => e.complete && e.naturalWidth > 0)", timeout=60_000
    )
    widths = page.eval_on_selector_all("#overlays img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) >= n and min(widths) == models.image_size * core.SCALE
    # the chain-rule total is shown and equals the allocator's own gain
    total = page.inner_text("#greedy_total")
    assert f"{expected.greedy_total:.4f}" in total and f"{expected.greedy_gain:.4f}" in total
    first = expected.greedy[0]
    gains_text = page.inner_text("#gains")
    assert "cumulative I (nats)" in gains_text and str(first["gain (nats)"]) in gains_text
    page.wait_for_timeout(500)
    shot = Path(os.environ.get("ARR_COC_SCREENSHOT", tmp_path / "microscope.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # offline: every request the page made went to our server
    hosts = {urlparse(u).hostname for u in requests if not u.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, sorted(u for u in requests if urlparse(u).hostname != "127.0.0.1")
    page.close()


@pytest.mark.parametrize("kind", ["text", "huge"])
def test_bad_upload_gives_a_message(server, browser, tmp_path, kind):
    models, url = server
    if kind == "text":
        path = tmp_path / "notes.png"
        path.write_text("this is not an image\n")
        want = "not an image"
    else:
        path = tmp_path / "huge.png"
        Image.new("1", (6000, 6000)).save(path)  # 36 M pixels, a few kB on disk
        want = "over the limit"
    page, _ = _open(browser, url)
    page.set_input_files("#upload input[type=file]", str(path))
    page.wait_for_function(
        f"document.querySelector('#message textarea').value.includes({want!r})", timeout=60_000
    )
    page.get_by_text(want).first.wait_for(timeout=10_000)  # the gr.Warning toast says it too
    body = page.inner_text("body")
    assert "Warning" in body and "Traceback" not in body and "Error" not in page.input_value("#message textarea")
    page.close()


def _summary_cells(page, name: str) -> list[str]:
    lines = [ln.strip() for ln in page.inner_text("#summary").splitlines() if ln.strip()]
    i = lines.index(name)
    return lines[i : i + 9]


def test_example_picker_and_budget_slider(server, browser):
    """Pick an example from the task generator, then move the budget slider: only the allocators re-run."""
    import time

    from arr_coc.microscope import core

    models, url = server
    ex = models.task.example(2)
    page, _ = _open(browser, url)
    page.click("#example input")
    page.locator("[data-testid=dropdown-option]").nth(2).click()
    page.wait_for_function("document.querySelectorAll('#overlays img').length >= 1", timeout=120_000)
    assert page.input_value("#question textarea") == ex.question
    assert ex.answer in page.inner_text("#truth")
    page.wait_for_function(
        "document.querySelector('#summary').innerText.split('\\n').map(s => s.trim()).includes('arr_coc')",
        timeout=60_000,
    )
    assert _summary_cells(page, "arr_coc")[2] == "16"
    img = ex.image.permute(1, 2, 0).numpy()
    want = core.analyse(models, img, ex.question, ["arr_coc"], 5, with_maps=False).runs["arr_coc"].answer
    t0 = time.perf_counter()
    page.locator("#budget input[type=range]").fill("5")
    page.dispatch_event("#budget input[type=range]", "pointerup")  # Gradio's slider "release"
    page.wait_for_function(
        """() => { const l = document.querySelector('#summary').innerText.split('\\n').map(s => s.trim()).filter(s => s);
                   const i = l.indexOf('arr_coc'); return i >= 0 && l[i + 2] === '5'; }""",
        timeout=30_000,
    )
    seconds = time.perf_counter() - t0
    cells = _summary_cells(page, "arr_coc")
    assert cells[4] == want, (want, cells)
    assert "cached" in page.inner_text("#timing")  # the image was not encoded again
    assert seconds < 5.0, seconds  # browser round trip; ~0.1-0.6 s measured (see the report)
    page.close()


def test_server_made_no_outside_connection(server, browser):
    """Runs last in this module: the server (Gradio, analytics, the models) looked up no outside host."""
    models, url = server
    page, _ = _open(browser, url)
    page.close()
    assert "127.0.0.1" in SERVER_LOOKUPS  # the recorder works: it saw Gradio's own start-up check
    assert set(SERVER_LOOKUPS) <= LOOPBACK, sorted(set(SERVER_LOOKUPS) - LOOPBACK)
