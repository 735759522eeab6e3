"""A full-page screenshot of a run's report, small enough to commit (< 300 KB).

    .venv/bin/python scripts/report_screenshot.py OUT_DIR PNG [--width 1200] [--config CONFIG]

Writes the report of the run at OUT_DIR (`batchinfer report`) to a temporary file, opens it
in headless Chromium (Debian's chromium-headless-shell; scripts/setup.sh --dev installs it)
with every network request blocked, waits for the plots, and saves a palette PNG.
tests/test_report.py drives the browser with `launch` and `open_report` from here.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("BATCHINFER_CHROMIUM", "/usr/bin/chromium-headless-shell")
"""The browser: Debian's headless shell (playwright's own download is not reachable here)."""
MAX_PNG_BYTES = 300_000
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def open_report(browser, html_path: Path, width: int = 1200):
    """A page showing the report, its plots drawn. Returns (page, problems): `problems`
    collects console errors, page errors and network requests (each aborted), as they come."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: dict[str, list[str]] = {"console": [], "pageerror": [], "requests": []}
    page.on("console", lambda m: problems["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems["pageerror"].append(str(e)))

    def route(r):
        if r.request.url.startswith(LOCAL_SCHEMES):
            r.continue_()
        else:
            problems["requests"].append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(Path(html_path).resolve().as_uri())
    # each plot's div gets plotly's .plot-container once drawn
    page.wait_for_function("document.querySelectorAll('.plot').length === "
                           "document.querySelectorAll('.plot .plot-container').length", timeout=30_000)
    return page, problems


def small_png(png: bytes, limit: int = MAX_PNG_BYTES) -> bytes:
    """A palette PNG of the screenshot: fewer colors, then a smaller image, until under `limit`."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    while True:
        for colors in (64, 32, 16):
            buf = io.BytesIO()
            image.quantize(colors=colors).save(buf, format="PNG", optimize=True)
            if buf.tell() < limit:
                return buf.getvalue()
        image = image.resize((int(image.width * 0.85), int(image.height * 0.85)), Image.LANCZOS)


def screenshot(out_dir: str, png: Path, width: int = 1200, storage_cfg=None, browser=None) -> int:
    """Write the PNG (with `browser`, or one launched here); returns its size in bytes."""
    from playwright.sync_api import sync_playwright

    from batchinfer.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        html_path = write_report(out_dir, storage_cfg, Path(tmp) / "report.html")
        if browser is None:
            with sync_playwright() as p:
                own = launch(p)
                try:
                    raw, problems = _shoot(own, html_path, width)
                finally:
                    own.close()
        else:
            raw, problems = _shoot(browser, html_path, width)
    if any(problems.values()):
        print(f"warning: the page had problems: {problems}", file=sys.stderr)
    data = small_png(raw)
    png.write_bytes(data)
    return len(data)


def _shoot(browser, html_path: Path, width: int) -> tuple[bytes, dict[str, list[str]]]:
    page, problems = open_report(browser, html_path, width)
    try:
        return page.screenshot(full_page=True), problems
    finally:
        page.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="the run directory (local path or URL)")
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--config", help="take the storage settings from this config")
    args = ap.parse_args()
    storage_cfg = None
    if args.config:
        from batchinfer.config_loader import load_config

        storage_cfg = load_config(args.config, ()).storage
    size = screenshot(args.out_dir, args.png, args.width, storage_cfg)
    print(f"{args.png} ({size / 1000:.0f} KB)")


if __name__ == "__main__":
    main()
