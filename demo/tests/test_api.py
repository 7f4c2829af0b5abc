"""The store app's API with the whole gateway behind it: the pipeline indexes the catalogue, search
finds products, a fetch reports the cache, a price edit shows at once; plus the catalogue script and
the embedder on their own."""

import json
import subprocess
import sys
import time

import embedder
from conftest import DEMO, ROOT, wait_for

CATALOGUE = json.loads((DEMO / "catalogue.json").read_text(encoding="utf-8"))
BY_ID = {p["id"]: p for p in CATALOGUE}


def test_catalogue_is_what_the_script_writes_and_small():
    checked = subprocess.run([sys.executable, str(DEMO / "make_catalogue.py"), "--check"], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (DEMO / "catalogue.json").stat().st_size < 200_000
    assert len(CATALOGUE) == len(BY_ID) == 300
    for product in CATALOGUE:
        assert product["id"].startswith("asin-B0") and product["title"] and product["description"]
        assert product["price"] > 0 and product["category"]


def test_embedder_is_deterministic_normalised_and_lexical():
    a, again = embedder.embed("walnut desk lamp"), embedder.embed("walnut desk lamp")
    assert a == again and len(a) == embedder.DIMS
    assert abs(sum(x * x for x in a) - 1.0) < 1e-4

    def cosine(x, y):
        return sum(p * q for p, q in zip(x, y))

    assert cosine(a, embedder.embed("a desk lamp")) > cosine(a, embedder.embed("camping stove")) + 0.2


def test_banner_names_the_store_and_the_gateway(demo):
    assert demo["url"] in demo["banner"]
    assert f"http://127.0.0.1:{demo['ports']['GATEWAY_PORT']}" in demo["banner"]
    page = demo["http"].get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text and "feature-hashing" in page.text


def test_pipeline_indexes_the_whole_catalogue(demo, indexed):
    assert indexed["counts"] == {"pending": 0, "embedding": 0, "indexed": 300, "failed": 0}
    assert indexed["status"] == "idle"
    progress = indexed["progress"]
    assert (progress["staged"], progress["embedded"], progress["error"]) == (300, 300, None)
    assert progress["batches"] >= 300 // 25, "the embedding worker took the catalogue in batches"
    # The namespace's read watermark, from the gateway's x-layer-stable-as-of header.
    assert isinstance(indexed["stable_as_of"], int) and indexed["stable_as_of"] > 1_700_000_000_000


def search(demo, q, mode):
    response = demo["http"].get("/api/search", params={"q": q, "mode": mode})
    assert response.status_code == 200, response.text
    return response.json()


def test_search_by_vector_bm25_and_both(demo, indexed):
    hybrid = search(demo, "desk lamp", "hybrid")
    assert hybrid["notes"] == [] and len(hybrid["results"]) == 10
    top = hybrid["results"][:3]
    assert all("desk lamp" in r["title"] for r in top), top
    assert all(set(r["ranks"]) == {"vector", "bm25"} for r in top), "the top hits rank in both legs"
    scores = [r["score"] for r in hybrid["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    for r in hybrid["results"]:
        assert r["price"] == BY_ID[r["id"]]["price"]
        assert r["title"] == BY_ID[r["id"]]["title"]
    assert isinstance(hybrid["stable_as_of"], int)

    vector = search(demo, "wireless headphones", "vector")["results"]
    assert "wireless headphones" in vector[0]["title"] and 0 < vector[0]["score"] <= 1
    bm25 = search(demo, "walnut", "bm25")["results"]
    assert bm25 and all("walnut" in BY_ID[r["id"]]["description"] for r in bm25)
    assert search(demo, "", "hybrid")["results"] == []
    assert demo["http"].get("/api/search", params={"q": "x", "mode": "nope"}).status_code == 422


def test_product_fetch_reports_the_cache_and_the_stamp(demo, indexed):
    product = CATALOGUE[7]
    first = demo["http"].get(f"/api/products/{product['id']}").json()
    assert first["cache"] in ("hit", "miss")
    second = demo["http"].get(f"/api/products/{product['id']}").json()
    assert second["cache"] == "hit", "the second fetch is served from the document cache"
    assert second["attributes"]["title"] == product["title"]
    assert second["price"] == product["price"]
    stamp = second["upserted_at"]
    assert isinstance(stamp, int) and abs(time.time() * 1000 - stamp) < 600_000, stamp
    missing = demo["http"].get("/api/products/asin-NOPE")
    assert missing.status_code == 404


def test_price_edit_shows_at_once(demo, indexed):
    product = CATALOGUE[11]
    before = demo["http"].get(f"/api/products/{product['id']}").json()
    edited = demo["http"].post(f"/api/products/{product['id']}/price", json={"price": "7.25"})
    assert edited.status_code == 200 and edited.json()["rows_affected"] == 1, edited.text
    after = demo["http"].get(f"/api/products/{product['id']}").json()
    assert after["price"] == 7.25 and after["attributes"]["price_cents"] == 725
    assert after["cache"] == "hit", "the patch was merged into the cached document"
    assert after["upserted_at"] > before["upserted_at"], "the patch was stamped anew"
    assert after["attributes"]["title"] == product["title"], "the patch kept the other attributes"
    found = search(demo, product["title"], "bm25")["results"]
    assert next(r for r in found if r["id"] == product["id"])["price"] == 7.25
    for bad in ("-3", "abc", "0", ""):
        assert demo["http"].post(f"/api/products/{product['id']}/price", json={"price": bad}).status_code == 422


def test_the_store_and_its_workers_go_through_the_gateway(demo, indexed):
    """Their calls (pipeline, queries, fetches, the schema) are in the Envoy access log of the demo's gateway."""
    log = ROOT / ".run" / f"gateway-{demo['ports']['GATEWAY_PORT']}" / "logs" / "access.log"
    paths = ("/v2/pipelines/demo-store-embed/claim", "/v2/pipelines/demo-store-embed/documents/asin-",
             "/v2/namespaces/demo-store/query", "/v2/namespaces/demo-store/documents/asin-",
             "/v1/namespaces/demo-store/schema")
    # Envoy writes its access log out every few seconds.
    wait_for(lambda: all(p in log.read_text() for p in paths), "every kind of call in the access log", 15)


def test_the_pipeline_runs_again_on_request(demo, indexed):
    http = demo["http"]
    assert http.post("/api/pipeline/run").status_code == 202
    assert http.post("/api/pipeline/run").status_code == 409, "one run at a time"

    def second_run_done():
        state = http.get("/api/pipeline").json()
        done = state["progress"]["run"] == 2 and not state["progress"]["running"]
        return state if done else None

    state = wait_for(second_run_done, "the second run", 60)
    assert state["progress"]["error"] is None and state["progress"]["embedded"] == 300
    assert state["counts"] == {"pending": 0, "embedding": 0, "indexed": 300, "failed": 0}
