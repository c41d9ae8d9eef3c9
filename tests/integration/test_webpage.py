"""The worklist page in a real headless Chromium against a real uvicorn server."""
import io
import re
import shutil
import socket
import threading
from contextlib import contextmanager

import pytest
import uvicorn
from PIL import Image, ImageDraw

from node.api import create_app
from tests.helpers import Site, chromium

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")

STAT_STUDY, ROUTINE_STUDY = "1.2.826.0.1.7", "1.2.826.0.1.3"
BANNER_RGB = (0xFF, 0xD6, 0x0A)


def heatmap_png() -> bytes:
    image = Image.new("RGB", (256, 256), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 24, 216, 232), fill=(90, 90, 90))
    draw.ellipse((130, 80, 180, 130), fill=(230, 40, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def populate(site: Site) -> None:
    site.analysed(ROUTINE_STUDY, ROUTINE_STUDY + ".1", 0.03, name="ROE^RICHARD")  # arrived first
    site.analysed(STAT_STUDY, STAT_STUDY + ".1", 0.93, volume=38.2, thumbnails=(heatmap_png(),) * 2,
                  name="DOE^JANE")


@contextmanager
def serve(app):
    """uvicorn on an ephemeral port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        thread.join(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path / "node")
    populate(site)
    return site


@pytest.fixture
def url(site):
    with serve(site.app) as base:
        yield base


def test_stat_study_is_listed_first_and_marked(tmp_path, url):
    dom = chromium(tmp_path, "--dump-dom", url)
    order = re.findall(r'data-study-uid="([0-9.]+)"', dom)
    assert order == [STAT_STUDY, ROUTINE_STUDY]
    assert re.search(r'class="badge badge-stat">STAT<', dom)
    assert "DOE, JANE" in dom and "93%" in dom and "38.2 mL" in dom
    assert len(re.findall(r'<img class="thumbnail"[^>]* src="blob:', dom)) == 2  # fetched through the API
    assert re.search(r'<div id="disclaimer"[^>]*>\s*NOT FOR DIAGNOSTIC USE', dom)
    assert "List NOT up to date" not in dom


def test_disclaimer_banner_is_visible_on_screen(tmp_path, url):
    shot = tmp_path / "worklist.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,700", "--hide-scrollbars", url)
    image = Image.open(shot).convert("RGB")
    top_band = [image.getpixel((x, 5)) for x in range(0, image.width, 50)]
    assert all(pixel == BANNER_RGB for pixel in top_band)


def test_page_says_when_the_api_token_is_missing(tmp_path, site):
    """With a token configured and none given, the page says so instead of showing a stale list."""
    http = site.settings.http.model_copy(update={"api_token": "s3cret"})
    settings = site.settings.model_copy(update={"http": http})
    with serve(create_app(site.store, settings)) as base:
        dom = chromium(tmp_path, "--dump-dom", base)
    assert "List NOT up to date — API token needed" in dom
    assert re.search(r'<form id="token-form" class="token-form">', dom)  # shown: no longer hidden
    assert "data-study-uid" not in dom
