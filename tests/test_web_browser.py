"""The pages in a real browser: Playwright for Python driving Debian's Chromium (`make test` installs it;
Playwright's own browser download is not used). The page classifies scikit-image's chelsea as a cat, says a
text file is not an image, reads a digit with lenet5, works by keyboard and at a phone's width, asks for the
token and keeps it in memory only; Swagger UI shows the classify operation. Every request the browser makes
goes to the server under test, and each test leaves a screenshot in its temporary folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import WEB_TOKEN
from tests.http_server import Server

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CAT_WORDS = ("cat", "tabby", "lynx", "tiger")
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium) and could "
            "not here; set CHROMIUM to another Chromium binary"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Visit:
    """A page of a fresh browser context (nothing kept between tests), with every request it made and every
    console error (a Content-Security-Policy violation is one)."""

    def __init__(self, browser: Any, server: Server, width: int = 1000) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def elsewhere(self) -> list[str]:
        """Requests that went anywhere but the server under test (a blob: URL never leaves the browser)."""
        return [u for u in self.requests if not u.startswith((self.server.url + "/", "blob:", "data:"))]


@pytest.fixture
def visit(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """`visit(server)`: a page on that server; its screenshot is saved in the test's folder at the end, and
    the test fails if the browser sent anything elsewhere or logged an error it did not expect."""
    visits: list[Visit] = []

    def open_page(server: Server, width: int = 1000) -> Visit:
        visits.append(Visit(browser, server, width))
        return visits[-1]

    yield open_page
    for i, v in enumerate(visits):
        v.page.screenshot(path=str(tmp_path / f"{request.node.name}-{i}.png"), full_page=True)
        v.context.close()
        assert v.elsewhere() == [], "the browser sent requests elsewhere"
        unexpected = [e for e in v.errors if "401" not in e and "404" not in e and "400" not in e]
        assert unexpected == [], unexpected


def jpeg_file(folder: Path, array: np.ndarray, name: str) -> Path:
    path = folder / name
    Image.fromarray(array).convert("RGB").save(path, format="JPEG", quality=90)
    return path


def digit_png(folder: Path) -> tuple[Path, str]:
    """The last of scikit-learn's digits, dark on light as a written digit would be, and its value."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = (digits.images[-1] / 16.0 * 255).astype(np.uint8)
    path = folder / "digit.png"
    Image.fromarray(255 - ink).resize((32, 32), Image.Resampling.BILINEAR).save(path)
    return path, str(digits.target[-1])


def choose_model(page: Any, name: str) -> None:
    index = page.evaluate(
        "n => [...document.querySelectorAll('#model option')].findIndex(o => o.text.startsWith(n + ' '))",
        name,
    )
    assert index >= 0, page.inner_text("#model")
    page.select_option("#model", str(index))


def top(page: Any) -> tuple[str, str]:
    first = page.locator("#predictions li").first
    return first.locator(".name").inner_text(), first.locator(".probability").inner_text()


def test_the_page_classifies_chelsea_as_a_cat(web_server: Server, visit: Any, tmp_path: Path) -> None:
    from skimage import data

    v = visit(web_server)
    v.page.goto(web_server.url + "/")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    assert "efficientnet_lite0" in v.page.locator("#model option:checked").inner_text()
    v.page.set_input_files("#file", str(jpeg_file(tmp_path, data.chelsea(), "chelsea.jpg")))
    v.page.wait_for_selector("#predictions li")
    label, probability = top(v.page)
    assert any(w in label.lower() for w in CAT_WORDS), label
    assert probability.endswith("%") and v.page.locator("#predictions li").count() == 5
    meta = v.page.inner_text("#meta")
    assert "efficientnet_lite0, version 1" in meta and " ms" in meta
    assert v.page.evaluate("document.getElementById('preview').naturalWidth") == data.chelsea().shape[1]
    assert v.page.locator("#error").is_hidden()
    posts = [u for u in v.requests if "/classify?" in u]
    assert len(posts) == 1 and posts[0].startswith(web_server.url + "/classify?model=efficientnet_lite0")


def test_the_page_says_a_text_file_is_not_an_image(web_server: Server, visit: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a picture\n")
    v = visit(web_server)
    v.page.goto(web_server.url + "/")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    v.page.set_input_files("#file", str(notes))
    v.page.wait_for_selector("#error:not([hidden])")
    assert "not an image" in v.page.inner_text("#error")
    assert v.page.locator("#result").is_hidden()


DROP_AND_PASTE = """([kind, bytes]) => {
    const file = new File([new Uint8Array(bytes)], "digit.png", { type: "image/png" });
    const data = new DataTransfer();
    data.items.add(file);
    if (kind === "paste") {
        document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
    } else {
        const drop = new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true });
        document.getElementById("drop").dispatchEvent(drop);
    }
}"""


@pytest.mark.parametrize("kind", ["drop", "paste"])
def test_the_page_takes_a_dropped_or_pasted_image(
    web_server: Server, visit: Any, tmp_path: Path, kind: str
) -> None:
    path, digit = digit_png(tmp_path)
    v = visit(web_server)
    v.page.goto(web_server.url + "/")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    choose_model(v.page, "lenet5")
    v.page.evaluate(DROP_AND_PASTE, [kind, list(path.read_bytes())])
    v.page.wait_for_selector("#meta:has-text('lenet5')")
    assert top(v.page)[0] == digit
    assert v.page.inner_text("#filename").startswith("digit.png")


def test_the_page_names_an_unknown_model(web_server: Server, visit: Any, tmp_path: Path) -> None:
    """A model that left the server after the page listed it: the server's 404, in plain words. The page's
    list is the server's own answer with one model added, so that the page can ask for it."""
    from skimage import data

    def with_a_gone_model(route: Any) -> None:
        answer = route.fetch()
        body = answer.json()
        body["models"].append({**body["models"][0], "name": "retired_model", "version": "1"})
        route.fulfill(response=answer, json=body)

    v = visit(web_server)
    v.page.route(web_server.url + "/models", with_a_gone_model)
    v.page.goto(web_server.url + "/")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    choose_model(v.page, "retired_model")
    v.page.set_input_files("#file", str(jpeg_file(tmp_path, data.chelsea(), "chelsea.jpg")))
    v.page.wait_for_selector("#error:not([hidden])")
    assert "Unknown model: retired_model" in v.page.inner_text("#error")


def test_the_page_reads_a_digit_with_lenet5(web_server: Server, visit: Any, tmp_path: Path) -> None:
    path, digit = digit_png(tmp_path)
    v = visit(web_server)
    v.page.goto(web_server.url + "/")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    choose_model(v.page, "lenet5")
    assert v.page.get_attribute("#top-k", "max") == "10"  # bounded by the model's class count
    v.page.set_input_files("#file", str(path))
    v.page.wait_for_selector("#meta:has-text('lenet5')")
    assert top(v.page)[0] == digit
    assert "lenet5, version 1" in v.page.inner_text("#meta")


def test_the_page_works_by_keyboard_and_at_a_phone_width(
    web_server: Server, visit: Any, tmp_path: Path
) -> None:
    from skimage import data

    v = visit(web_server, width=360)
    v.page.goto(web_server.url + "/")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    v.page.focus("#model")
    order = []
    for _ in range(4):
        v.page.keyboard.press("Tab")
        order.append(v.page.evaluate("document.activeElement.id"))
    assert order == ["tta", "top-k", "file", "classify"], order
    v.page.focus("#tta")
    v.page.keyboard.press("ArrowDown")  # none -> flip
    assert v.page.input_value("#tta") == "flip"
    v.page.focus("#top-k")
    v.page.keyboard.press("Control+A")
    v.page.keyboard.type("3")
    v.page.set_input_files("#file", str(jpeg_file(tmp_path, data.coffee(), "coffee.jpg")))
    v.page.wait_for_selector("#predictions li")
    assert v.page.locator("#predictions li").count() == 3
    v.page.focus("#classify")
    with v.page.expect_response(lambda r: "/classify?" in r.url and "tta=flip" in r.url) as answer:
        v.page.keyboard.press("Enter")  # classifies again, by keyboard alone
    assert answer.value.status == 200
    v.page.wait_for_selector("#status:has-text('Done')")
    assert v.page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the phone


def test_the_page_asks_for_the_token_and_keeps_it_in_memory(
    token_server: Server, visit: Any, tmp_path: Path
) -> None:
    v = visit(token_server)
    v.page.goto(token_server.url + "/")
    v.page.wait_for_selector("#token-form:not([hidden])")
    v.page.fill("#token", "not-the-token")
    v.page.keyboard.press("Enter")
    v.page.wait_for_selector("#token-note:has-text('refused')")
    v.page.fill("#token", WEB_TOKEN)
    v.page.keyboard.press("Enter")
    v.page.wait_for_selector("#model option:not([value=''])", state="attached")
    assert v.page.locator("#token-form").is_hidden() and v.page.input_value("#token") == ""
    path, digit = digit_png(tmp_path)
    v.page.set_input_files("#file", str(path))
    v.page.wait_for_selector("#predictions li")
    assert top(v.page)[0] == digit
    stored = v.page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]
    # A picture over the server's limit (1 MiB here) is refused in plain words, without being sent.
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    big = tmp_path / "noise.png"
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > 1024 * 1024
    sent = len(v.requests)
    v.page.set_input_files("#file", str(big))
    v.page.wait_for_selector("#error:not([hidden])")
    assert "too large" in v.page.inner_text("#error") and "1.0 MB" in v.page.inner_text("#error")
    assert not [u for u in v.requests[sent:] if "/classify" in u]
    # Memory only: a new load of the page asks again.
    v.page.reload()
    v.page.wait_for_selector("#token-form:not([hidden])")


def test_swagger_ui_shows_the_classify_operation(web_server: Server, visit: Any) -> None:
    v = visit(web_server, width=1200)
    v.page.goto(web_server.url + "/docs")
    operation = v.page.wait_for_selector("#operations-classify-classify")
    assert "/classify" in operation.inner_text() and "Classify one image" in operation.inner_text()
    v.page.click("#operations-classify-classify .opblock-summary")
    v.page.wait_for_selector("#operations-classify-classify .opblock-body")
    body = v.page.inner_text("#operations-classify-classify")
    assert "multipart/form-data" in body or "Request body" in body
    assert "OAS 3.1" in v.page.inner_text(".information-container, .info")


def test_swagger_ui_asks_for_the_token(token_server: Server, visit: Any) -> None:
    v = visit(token_server, width=1200)
    v.page.goto(token_server.url + "/docs")
    v.page.wait_for_selector("#token-form:not([hidden])")
    v.page.fill("#token", WEB_TOKEN)
    v.page.keyboard.press("Enter")
    v.page.wait_for_selector("#operations-classify-classify")
    assert v.page.locator("button.authorize").count() == 1  # the document's bearer scheme
