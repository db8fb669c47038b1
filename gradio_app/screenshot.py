"""A screenshot of the app editing a demo person, for the docs.

    python -m gradio_app.screenshot docs/img/app_edit.png

Serves the app on the synthetic demo world on a free local port, opens it in headless Chromium
(Playwright), picks the first sample person, turns the light to the side, runs the edit (with the
demo's default of starting from the photo's inversion) and saves the visible page. Needs ``playwright`` and a Chromium (Debian's
``chromium`` package is found at /usr/bin/chromium; Playwright's own browser works too).
"""
from __future__ import annotations

import argparse
import shutil
import socket
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(page, locator, what: str) -> None:
    """Wait for ``locator``, or fail with the app's own message if an error pops up instead."""
    error = page.locator(".toast-body.error")
    locator.or_(error).first.wait_for()
    if error.count():
        raise RuntimeError(f"{what} failed: {error.first.inner_text()}")


def take(out: Path, steps: int = 20, azimuth: int = -70, yaw: int = 0, width: int = 1400, height: int = 1000,
         chromium: str | None = None, timeout_s: float = 300.0) -> Path:
    from playwright.sync_api import sync_playwright

    from . import AppConfig, build_demo, serve

    demo = build_demo(AppConfig(demo=True, default_steps=steps))
    _, url = serve(demo, port=_free_port(), block=False, quiet=True)
    executable = chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            page.locator("#samples img").first.click()
            _wait(page, page.locator("#buffers img"), "showing the buffers")
            page.get_by_label("Direction").check()
            for elem_id, value in (("azimuth", azimuth), ("yaw", yaw)):
                if not value:
                    continue
                slider = page.locator(f"#{elem_id} input[type=range]")
                slider.fill(str(value))
                slider.dispatch_event("pointerup")
            page.locator("#run-edit").click()
            _wait(page, page.locator(".dr-info", has_text="DDIM steps"), "the edit")
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(1000)  # images finish loading
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        demo.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradio_app.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/img/app_edit.png"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: chromium on PATH)")
    args = parser.parse_args(argv)
    print(take(args.out, steps=args.steps, chromium=args.chromium))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
