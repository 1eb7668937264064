"""`vitlab serve` in a real headless browser: Playwright driving Debian's Chromium against the command
started on a free port with a tiny CNN run and a tiny ViT run. What the page shows is read from the DOM
(class names, the probabilities in the label's <meter>s, the pixels of the map images) and compared with
the same functions called in this process.

Skipped, with the reason, where Playwright, gradio or a chromium binary is missing (.ci/run installs
Debian's chromium; Playwright's own browser download is not used).
"""

import base64
import io
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import vitlab_process
from vitlab.data import CLASSES
from vitlab.inspect.images import test_images as cifar_test_images  # not collected as a test
from vitlab.serve import views
from vitlab.serve.runs import load_runs

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
pytest.importorskip("gradio", reason="gradio is not installed: pip install 'vitlab[serve]'")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install -y chromium (or run .ci/run)")

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
WAIT_SECONDS = 60  # a loaded 2-core machine answers in a few seconds; this is the limit, not the expectation


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_runs, serve_data):
    """`vitlab serve CNN VIT` on a free port: yields its URL once it says it is serving; stopped afterwards."""
    port = free_port()
    process = vitlab_process(["serve", str(served_runs["cnn"]), str(served_runs["vit"]), "--port", str(port), "--data-dir", str(serve_data)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()  # also keeps the pipe drained
    seen, deadline = [], time.monotonic() + 180
    try:
        while not any("serving at" in line for line in seen):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("vitlab serve did not start:\n" + "".join(seen))
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert f"serving at http://127.0.0.1:{port}/" in "".join(seen)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    """A page of the app in headless Chromium with a fresh profile, loaded and showing test image 0."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
                                                                headless=True, args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(WAIT_SECONDS * 1000)
        page.goto(server)
        wait_for_text(page, "#status", "test image 0")
        yield page
        context.close()


@pytest.fixture(scope="module")
def expected(served_runs, serve_data):
    """The runs and test images as this process sees them, for comparing with the page."""
    return load_runs([served_runs["cnn"], served_runs["vit"]]), cifar_test_images(10, str(serve_data))


def wait_for_text(page, selector: str, text: str) -> str:
    page.wait_for_function("([selector, text]) => (document.querySelector(selector)?.innerText ?? '').includes(text)", arg=[selector, text])
    return page.inner_text(selector)


def eventually(read, wanted, what: str):
    """Poll `read()` until it equals `wanted` (the page updates after the event that changed it)."""
    deadline, value = time.monotonic() + WAIT_SECONDS, None
    while time.monotonic() < deadline:
        value = read()
        if value == wanted:
            return value
        time.sleep(0.25)
    pytest.fail(f"{what}: the page shows {value!r}, expected {wanted!r}")


def shown_top5(page, number: int) -> list[str]:
    return page.eval_on_selector_all(f"#top5-{number} dt", "items => items.map(item => item.innerText.trim())")


def shown_probabilities(page, number: int) -> list[float]:
    return page.eval_on_selector_all(f"#top5-{number} meter", "meters => meters.map(meter => Number(meter.getAttribute('value')))")


def shown_pixels(page, selector: str) -> np.ndarray | None:
    """The RGB pixels of the <img> under `selector` as the browser decoded them (None while there is none),
    passed back as a PNG re-encoded by a canvas: lossless, and one string rather than a list of numbers."""
    url = page.evaluate("""async (selector) => {
        const image = document.querySelector(selector + ' img');
        if (!image || !image.src) return null;
        try { await image.decode(); } catch (error) { return null; }
        const canvas = document.createElement('canvas');
        [canvas.width, canvas.height] = [image.naturalWidth, image.naturalHeight];
        canvas.getContext('2d').drawImage(image, 0, 0);
        return canvas.toDataURL('image/png');
    }""", selector)
    if url is None:
        return None
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def assert_shows(page, selector: str, wanted: np.ndarray, what: str) -> None:
    eventually(lambda: (lambda shown: shown is not None and shown.shape == wanted.shape and int(np.abs(shown.astype(int) - wanted).max()) <= 1)(
        shown_pixels(page, selector)), True, what)


def assert_predictions(page, runs, image, what: str) -> None:
    for number, run in enumerate(runs):
        top = views.top_classes(run, image)
        eventually(lambda number=number: shown_top5(page, number), list(top), f"{what}: top-5 of {run.name}")
        assert shown_probabilities(page, number) == pytest.approx(list(top.values()), abs=1e-5)


def test_the_page_shows_each_runs_top5_maps_and_training_figures(page, expected):
    runs, images = expected
    assert wait_for_text(page, "#status", "test image 0") == f"test image 0, true class: {images.true_name(0)}"
    assert_predictions(page, runs, images.images[0], "test image 0")
    cnn, vit = runs
    assert_shows(page, "#preview", views.enlarge(images.images[0]), "the chosen image")
    assert_shows(page, "#map-0", views.where_it_looks(cnn, images.images[0])[0], "Grad-CAM of the CNN run")
    assert_shows(page, "#map-1", views.where_it_looks(vit, images.images[0])[0], "attention rollout of the ViT run")
    assert_shows(page, "#attention-1", views.attention_overlay(vit, images.images[0], 2, 0)[0], "the ViT's last layer, heads averaged")
    assert wait_for_text(page, "#map-caption-0", "Grad-CAM").startswith("Grad-CAM at the last stage, for the predicted class")
    assert wait_for_text(page, "#attention-caption-1", "layer") == "layer 2 of 2, mean of 2 heads: CLS-to-patch attention"
    for number, run in enumerate(runs):
        assert_shows(page, f"#confusion-{number}", views.confusion_image(run)[0], f"confusion matrix of {run.name}")
        assert_shows(page, f"#curves-{number}", views.curves_image(run)[0], f"curves of {run.name}")


def upload(page, path: Path) -> None:
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(str(path))


def test_an_uploaded_png_is_predicted_and_other_files_are_refused(page, expected, tmp_path):
    runs, images = expected
    png = tmp_path / "test-image-7.png"
    Image.fromarray(images.images[7].permute(1, 2, 0).numpy()).save(png)  # 32×32: the upload is exactly that test image
    upload(page, png)
    assert wait_for_text(page, "#status", "uploaded") == "uploaded test-image-7.png, resized to 32×32"
    assert_predictions(page, runs, images.images[7], "uploaded PNG")
    assert_shows(page, "#map-1", views.where_it_looks(runs[1], images.images[7])[0], "rollout of the uploaded PNG")

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    upload(page, text)
    assert wait_for_text(page, "#status", "Refused") == "Refused: notes.txt is not an image; upload a PNG, JPEG, GIF, BMP or WebP file"
    assert shown_top5(page, 0) == list(views.top_classes(runs[0], images.images[7]))  # the last good image stays

    large = tmp_path / "large.png"
    large.write_bytes(os.urandom(6 * 2**20))
    upload(page, large)
    page.wait_for_function("document.body.innerText.includes('exceed the maximum allowed size of 5.0 Mb')")


def test_gallery_and_sliders_choose_the_image_layer_and_head(page, expected, tmp_path):
    runs, images = expected
    page.locator("#gallery button.thumbnail-item").nth(3).click()
    assert wait_for_text(page, "#status", "test image 3") == f"test image 3, true class: {images.true_name(3)}"
    assert page.input_value("#test-index input[type=number]") == "3"
    assert_predictions(page, runs, images.images[3], "gallery image 3")

    vit = runs[1]
    for selector, value in (("#layer-1", "1"), ("#head-1", "2")):
        page.fill(f"{selector} input[type=number]", value)
        page.keyboard.press("Enter")
    wait_for_text(page, "#attention-caption-1", "layer 1 of 2, head 2 of 2")
    assert_shows(page, "#attention-1", views.attention_overlay(vit, images.images[3], 1, 2)[0], "layer 1, head 2")

    page.fill("#test-index input[type=number]", "9")
    assert wait_for_text(page, "#status", "test image 9") == f"test image 9, true class: {images.true_name(9)}"
    assert_predictions(page, runs, images.images[9], "test image 9 by number")
    assert_shows(page, "#attention-1", views.attention_overlay(vit, images.images[9], 1, 2)[0], "layer 1, head 2 of image 9")

    screenshot = tmp_path / "serve.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] == 1400
    if os.environ.get("VITLAB_SERVE_SCREENSHOT"):  # how docs/figures/serve.png can be remade
        shutil.copyfile(screenshot, os.environ["VITLAB_SERVE_SCREENSHOT"])
    assert CLASSES[int(images.labels[9])] in page.inner_text("#status")
