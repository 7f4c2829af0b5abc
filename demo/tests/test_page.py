"""The page in a real headless Chromium: the pipeline panel's counts, a search, a product with its
cache status and stamp, a price edit. Saves a screenshot to .run/demo-screenshot.png."""

import shutil

import pytest

from browser import Browser
from conftest import DEMO, ROOT

SCREENSHOT = ROOT / ".run" / "demo-screenshot.png"


@pytest.fixture
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.stop()


def text_of(element_id):
    return f"(document.getElementById({element_id!r}) || {{}}).textContent"


def test_search_open_a_product_and_edit_its_price(demo, indexed, browser):
    browser.goto(demo["url"])
    # The pipeline panel shows the status route's counts and the namespace's stable_as_of.
    browser.wait_for(f"{text_of('count-indexed')} === '300'")
    assert browser.evaluate(text_of("count-pending")) == "0"
    assert browser.evaluate(text_of("count-failed")) == "0"
    assert browser.evaluate(text_of("stable-as-of")).split()[0].isdigit()
    assert "hashed into 256 dimensions" in browser.evaluate(text_of("embedder"))

    browser.evaluate("document.getElementById('q').value = 'walnut desk lamp'")
    browser.evaluate("document.getElementById('search-form').requestSubmit()")
    browser.wait_for("document.querySelectorAll('#results li').length === 10")
    first = browser.evaluate("""(() => { const li = document.querySelector('#results li');
        return {id: li.dataset.id, title: li.querySelector('.title').textContent,
                price: li.querySelector('.price').textContent, meta: li.querySelector('.score').textContent}; })()""")
    assert "desk lamp" in first["title"] and first["price"].startswith("$"), first
    assert "score" in first["meta"] and "vector #" in first["meta"], first

    browser.evaluate("document.querySelector('#results li').click()")
    browser.wait_for(f"document.getElementById('product').dataset.id === {first['id']!r}")
    assert browser.evaluate(text_of("product-title")) == first["title"]
    assert browser.evaluate(text_of("cache-status")) in ("hit", "miss")
    stamp = browser.evaluate(text_of("upserted-at"))
    assert stamp.split()[0].isdigit() and "UTC" in stamp, stamp

    browser.evaluate("document.getElementById('price-input').value = '42.50'")
    browser.evaluate("document.getElementById('price-form').requestSubmit()")
    browser.wait_for(f"{text_of('price-result')}.includes('patch_rows')")
    assert browser.evaluate(text_of("product-price")) == "$42.50"
    assert browser.evaluate(text_of("cache-status")) == "hit"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.screenshot(SCREENSHOT)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if (ROOT / ".run" / "update-screenshot").exists():  # `touch .run/update-screenshot` refreshes the README's
        shutil.copy(SCREENSHOT, DEMO / "screenshot.png")
