"""The page in a real browser: headless Debian chromium driven by Playwright uploads a real photo,
sees results with attribute chips, opens one and sees its heat-map overlays and reasons.

Needs /usr/bin/chromium (Debian's ``chromium``) and the ``playwright`` package; ``.ci/run``
installs both. The screenshots go to the test's output folder (``$FASHIONLENS_TEST_OUTPUT``, or
pytest's temporary folder), and the test fails if the page asks anything of the internet.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from attribute_world import build_attribute_world, draw
from conftest import SHARED
from fashionlens.cli.serve_process import Server

CHROMIUM = Path(os.environ.get("FASHIONLENS_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

# CI sets FASHIONLENS_REQUIRE_BROWSER: there a missing browser is a failure, not a skip.
REQUIRED = bool(os.environ.get("FASHIONLENS_REQUIRE_BROWSER"))
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file() and not REQUIRED,
                                reason=f"no browser at {CHROMIUM} (apt install chromium)")


def real_photo(root: Path) -> Path:
    """A buyer's photo from the shared data when it is there, else a drawn JPEG."""
    found = sorted((SHARED / "consumer" / "test" / "shirt").glob("*.jpg"))[:1]
    if found:
        return found[0]
    draw(root / "drawn.jpg", 3, (200, 260))
    return root / "drawn.jpg"


def test_upload_see_results_open_an_explanation(tmp_path_factory, tmp_path):
    if REQUIRED:
        import playwright.sync_api as sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    out = Path(os.environ.get("FASHIONLENS_TEST_OUTPUT", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    world = build_attribute_world(tmp_path_factory.mktemp("browser"))
    index = world["root"] / "served"
    shutil.copytree(world["index"], index)
    photo = real_photo(tmp_path)
    with Server(index) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests, problems = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(srv.url + "/")
            page.wait_for_function("document.querySelectorAll('#wants select').length > 0")
            assert "13 items" in page.inner_text("#catalog-info")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector(".card")
            cards = page.locator(".card")
            assert cards.count() == 12  # default_k
            assert page.locator(".card .chip").count() > 0
            page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
            assert "results in" in page.inner_text("#status")
            page.screenshot(path=str(out / "results.png"), full_page=True)
            first = cards.first.get_attribute("data-id")
            cards.first.click()
            page.wait_for_selector("dialog[open] img.overlay")
            page.wait_for_function(
                "[...document.querySelectorAll('dialog img.overlay')].every(i => i.complete && i.naturalWidth > 0)")
            dialog_text = page.inner_text("dialog")
            assert first in dialog_text and "where the model looked" in dialog_text
            assert page.locator("dialog img.overlay").count() >= 1
            assert page.locator("dialog .reason-text").inner_text().strip()
            page.screenshot(path=str(out / "explanation.png"), full_page=True)
            page.click("#close")
            # a wanted attribute value narrows the results to it
            page.click("#wants-box summary")
            page.select_option("#wants select[data-attribute='neckline']", "v-shape")
            page.click("#search")
            page.wait_for_function("document.querySelector('.card .reason') && "
                                   "document.querySelector('.card .reason').textContent.startsWith('wanted: v-shape')")
            # a non-image gets the server's message, shown on the page
            page.set_input_files("#file", {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"})
            page.wait_for_selector("#status.error")
            assert "not a usable photo" in page.inner_text("#status")
        finally:
            browser.close()
    assert not problems or all("422" in p or "Unprocessable" in p for p in problems), problems
    outside = [u for u in requests if not u.startswith(srv.url) and not u.startswith(("blob:", "data:"))]
    assert not outside, outside
    assert (out / "results.png").stat().st_size > 10_000 and (out / "explanation.png").is_file()
