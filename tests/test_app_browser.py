"""The app in a real browser: Playwright drives Debian's Chromium (headless, no sandbox, no
background networking) against the app served on a free localhost port, on a tiny synthetic world.

(docs/img/app_edit.png comes from ``python -m gradio_app.screenshot``, on the real demo model.)
"""
from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest

from app_world import make_world, write_bad_files

pytestmark = [pytest.mark.browser,
              # pandas 3 deprecations inside Gradio's queue statistics, not ours
              pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and Path(p).exists()), None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, world): the app on the tiny world, served from this process."""
    pytest.importorskip("gradio", reason="the app needs gradio (pip install -e '.[app]')")
    from gradio_app import launch
    from gradio_app.app import AppConfig, Engine

    root = tmp_path_factory.mktemp("browser_world")
    world = make_world(root / "world", n_models=1)
    mp = pytest.MonkeyPatch()
    mp.setenv("DIFFUSIONRIG_MODELS", str(root / "no_models_here"))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    engine = Engine(AppConfig(demo=True, work_dir=root / "work", default_steps=STEPS, max_pixels=4_000_000,
                              default_invert=False), demo_world=world)
    demo, url = launch(engine=engine, port=_free_port(), block=False, quiet=True)
    yield url, world
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (pip install playwright)")
    if CHROMIUM is None:
        pytest.skip("browser tests need Chromium (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(served[0])
    pg.locator("#run-edit").wait_for()
    yield pg
    context.close()


def _edit_and_wait(page) -> str:
    """Press Edit; return the 'after' image's address once the result is shown."""
    before = page.locator("#result img").count()
    page.locator("#run-edit").click()
    page.locator("#result img").nth(1 if before == 0 else 0).wait_for()
    page.locator(".dr-info", has_text="DDIM steps").first.wait_for()
    return page.locator("#result img").last.get_attribute("src") or ""


def test_upload_move_a_light_slider_edit_and_see_the_result(page, served, tmp_path):
    url, world = served
    page.locator("#photo input[type=file]").set_input_files(str(world.photos["Person 1 · 1"]))
    page.locator("#buffers img").first.wait_for()  # the buffers preview follows the upload
    page.get_by_label("Direction").check()
    slider = page.locator("#azimuth input[type=range]")
    slider.fill("60")
    slider.dispatch_event("pointerup")  # what a mouse release sends: the preview re-renders
    src = _edit_and_wait(page)
    assert src
    assert page.locator("#pasted img").count() == 1
    assert "Seed" in page.locator(".dr-info").first.inner_text()
    shot = tmp_path / "app_edit.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_a_bad_upload_shows_a_clear_message_and_the_app_keeps_working(page, served, tmp_path):
    url, world = served
    bad = write_bad_files(tmp_path)
    page.locator("#photo input[type=file]").set_input_files(str(bad["not_image"]))
    toast = page.locator(".toast-body.error").filter(has_text="not an image")
    toast.first.wait_for()
    page.wait_for_timeout(400)  # let the message slide in before the screenshot
    page.screenshot(path=str(tmp_path / "app_bad_upload.png"))
    assert page.locator("#photo img").count() == 0  # the unusable file was taken out again
    # pick a sample person from the demo gallery instead, then edit
    page.locator("#samples img").first.click()
    page.locator("#buffers img").first.wait_for()
    assert _edit_and_wait(page)


def test_two_api_clients_editing_at_once_both_get_results(served):
    client_mod = pytest.importorskip("gradio_client", reason="needs gradio_client")
    url, world = served
    photos = [world.photos["Person 1 · 1"], world.photos["Person 2 · 1"]]
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            client = client_mod.Client(url, verbose=False)
            out = client.predict(photo=client_mod.handle_file(str(photos[i])), light_mode="Direction",
                                 azimuth=-45 + 90 * i, yaw=10, steps=STEPS, random_seed=False, seed=i,
                                 api_name="/edit")
            results[i] = out
        except Exception as exc:  # reported below with the client's number
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for i in range(2):
        compare, info, buffers, pasted, files, seed = results[i]
        assert Path(compare[1]).is_file() and Path(pasted).is_file()
        assert int(seed) == i and f"Seed **{i}**" in info
