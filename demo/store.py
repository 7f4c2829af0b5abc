"""The demo store: a small web app in front of the hev layer gateway (and only the gateway).

It serves the page (demo/static/) and a JSON API the page calls:
  GET  /api/search?q=...&mode=hybrid|vector|bm25   products by vector, BM25 or both (fused by RRF)
  GET  /api/products/{id}                          a document fetch (x-layer-cache, the stamp)
  POST /api/products/{id}/price {"price": 12.5}    a patch_rows write of the new price
  GET  /api/pipeline                               stage counts, workers' progress, stable_as_of
  POST /api/pipeline/run                           stage the catalogue again and embed it
  GET  /healthz

Every gateway call goes through the official `hevlayer` client on one event loop in a thread of
its own. On start it runs the two-stage pipeline (demo/pipeline.py) over demo/catalogue.json.
Configured from the environment: GATEWAY_URL (or GATEWAY_PORT), DEMO_PORT (8000), DEMO_API_KEY,
DEMO_NAMESPACE, DEMO_PIPELINE, DEMO_BATCH_SIZE, DEMO_STAGE_PAUSE, DEMO_EMBED_PAUSE (seconds)."""

import asyncio
import json
import os
import re
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from hevlayer import AsyncHevlayer, HevlayerError

import embedder
import pipeline

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
CATALOGUE = HERE / "catalogue.json"
ATTRIBUTES = ["title", "price_cents", "category"]
TOP_K = 10
RRF_K = 60
CALL_TIMEOUT = 30


class Store:
    """The app's state and its gateway calls; handlers run them on the client's event loop."""

    def __init__(self, gateway_url, api_key, settings: pipeline.Settings, products):
        self.settings = settings
        self.namespace = settings.namespace
        self.products = products
        self.gateway_url = gateway_url
        self.progress = pipeline.Progress()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="gateway-client", daemon=True).start()
        self.client = self.call(self._client(api_key, gateway_url))

    @staticmethod
    async def _client(api_key, gateway_url):
        return AsyncHevlayer(api_key=api_key, base_url=gateway_url, timeout=CALL_TIMEOUT)

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(CALL_TIMEOUT + 5)

    def start_pipeline(self):
        """Starts a run of both workers unless one is going; True if it started one."""
        async def start():
            if self.progress.running:
                return False
            self.progress.running = True
            task = asyncio.create_task(pipeline.run_pipeline(self.client, self.settings, self.products, self.progress))
            self.progress.tasks[:] = [task]
            return True
        return self.call(start())

    # ---- search -------------------------------------------------------------------------------

    async def _query(self, rank_by):
        response = await self.client.query_namespace(
            self.namespace, {"rank_by": rank_by, "top_k": TOP_K, "include_attributes": ATTRIBUTES})
        return response.rows, response.stable_as_of

    async def search(self, text, mode):
        legs = {}
        if mode in ("hybrid", "vector"):
            legs["vector"] = ["vector", "ANN", embedder.embed(text)]
        if mode in ("hybrid", "bm25"):
            legs["bm25"] = ["Sum", [["title", "BM25", text], ["description", "BM25", text]]]
        outcomes = await asyncio.gather(*(self._query(r) for r in legs.values()), return_exceptions=True)
        ranked, notes, stable = {}, [], None
        for leg, outcome in zip(legs, outcomes):
            if isinstance(outcome, HevlayerError):
                notes.append(f"{leg} query failed ({outcome.status_code}): {outcome.message}")
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            rows, stable_as_of = outcome
            stable = stable_as_of if stable_as_of is not None else stable
            ranked[leg] = rows
        return {"mode": mode, "results": fuse(ranked, mode), "stable_as_of": stable, "notes": notes}

    # ---- products -----------------------------------------------------------------------------

    async def product(self, doc_id):
        fetched = await self.client.fetch_document(self.namespace, doc_id, with_perf=True)
        attributes = fetched.data.attributes
        return {"id": fetched.data.id, "attributes": attributes, "cache": fetched.perf.cache_status,
                "upserted_at": attributes.get("_hevlayer_upserted_at"),
                "price": cents_to_price(attributes.get("price_cents"))}

    async def set_price(self, doc_id, cents):
        written = await self.client.write_namespace(
            self.namespace, {"patch_rows": [{"id": doc_id, "price_cents": cents}]})
        return {"rows_affected": written.rows_affected, "message": written.message}

    # ---- pipeline -----------------------------------------------------------------------------

    async def pipeline_state(self):
        state = {"pipeline_id": self.settings.pipeline_id, "namespace": self.namespace,
                 "products": len(self.products), "progress": self.progress.as_dict(),
                 "embedder": embedder.DESCRIPTION, "counts": None, "status": None, "stable_as_of": None}
        try:
            state["counts"], state["status"] = await pipeline.stage_counts(self.client, self.settings.pipeline_id)
        except HevlayerError as e:
            if e.status_code != 404:  # no pipeline yet: the first run is creating it
                raise
        try:
            # The namespace's read watermark, as the gateway reports it on any query.
            probe = await self.client.query_namespace(
                self.namespace, {"rank_by": ["id", "asc"], "top_k": 1, "include_attributes": ["id"]})
            state["stable_as_of"] = probe.stable_as_of
        except HevlayerError as e:
            if e.status_code != 404:  # no namespace until the first vectors land
                raise
        return state


def fuse(ranked, mode):
    """One list: a single leg keeps its order and score; two legs are fused by reciprocal rank."""
    by_id = {}
    for leg, rows in ranked.items():
        for rank, row in enumerate(rows, start=1):
            entry = by_id.setdefault(row["id"], {
                "id": row["id"], "title": row.get("title"), "category": row.get("category"),
                "price": cents_to_price(row.get("price_cents")), "ranks": {}, "score": 0.0})
            entry["ranks"][leg] = rank
            if mode == "hybrid":
                entry["score"] += 1.0 / (RRF_K + rank)
            elif leg == "vector":
                entry["score"] = 1.0 - row.get("$dist", 1.0)  # cosine similarity
            else:
                entry["score"] = row.get("$dist", 0.0)  # the BM25 score
    results = sorted(by_id.values(), key=lambda e: -e["score"])[:TOP_K]
    for entry in results:
        entry["score"] = round(entry["score"], 4)
    return results


def cents_to_price(cents):
    return None if cents is None else round(cents / 100, 2)


def price_to_cents(value):
    """A price from the page (a number or a numeric string) in cents, or None if it is not one."""
    text = str(value).strip().lstrip("$")
    if not re.fullmatch(r"\d{1,6}(\.\d{1,2})?", text):
        return None
    cents = round(float(text) * 100)
    return cents if cents > 0 else None


class Handler(BaseHTTPRequestHandler):
    server_version = "hevlayer-demo-store"
    store: Store = None  # set on the subclass made by serve()

    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("cache-control", "no-store")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _static(self, name):
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            return self._json(404, {"error": "not_found"})
        kinds = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
        body = files[name].read_bytes()
        self.send_response(200)
        self.send_header("content-type", kinds.get(files[name].suffix, "application/octet-stream"))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _guarded(self, work):
        try:
            work()
        except HevlayerError as e:
            status = e.status_code if e.status_code in (404, 422) else 502
            self._json(status, {"error": e.error or "gateway_error", "message": e.message,
                                "gateway_status": e.status_code})
        except (OSError, TimeoutError) as e:
            self._json(502, {"error": "gateway_unreachable", "message": str(e)})

    def do_GET(self):
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/healthz":
            return self._json(200, {"ok": True})
        if path == "/api/search":
            text = query.get("q", [""])[0].strip()
            mode = query.get("mode", ["hybrid"])[0]
            if mode not in ("hybrid", "vector", "bm25"):
                return self._json(422, {"error": "validation_error", "message": "mode is hybrid, vector or bm25"})
            if not text:
                return self._json(200, {"mode": mode, "results": [], "stable_as_of": None, "notes": []})
            return self._guarded(lambda: self._json(200, self.store.call(self.store.search(text, mode))))
        if path == "/api/pipeline":
            return self._guarded(lambda: self._json(200, self.store.call(self.store.pipeline_state())))
        match = re.fullmatch(r"/api/products/([^/]+)", path)
        if match:
            doc_id = unquote(match.group(1))
            return self._guarded(lambda: self._json(200, self.store.call(self.store.product(doc_id))))
        self._json(404, {"error": "not_found"})

    def do_POST(self):
        path = urlsplit(self.path).path
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path == "/api/pipeline/run":
            started = self.store.start_pipeline()
            return self._json(202 if started else 409, {"started": started})
        match = re.fullmatch(r"/api/products/([^/]+)/price", path)
        if not match:
            return self._json(404, {"error": "not_found"})
        try:
            cents = price_to_cents(json.loads(raw or b"{}").get("price"))
        except (ValueError, AttributeError):
            cents = None
        if cents is None:
            return self._json(422, {"error": "validation_error", "message": "price must be a positive amount like 12.50"})
        doc_id = unquote(match.group(1))
        self._guarded(lambda: self._json(200, self.store.call(self.store.set_price(doc_id, cents))))


def settings_from_env(env):
    return pipeline.Settings(
        pipeline_id=env.get("DEMO_PIPELINE", "demo-store-embed"),
        namespace=env.get("DEMO_NAMESPACE", "demo-store"),
        batch_size=int(env.get("DEMO_BATCH_SIZE", "16")),
        stage_pause=float(env.get("DEMO_STAGE_PAUSE", "0.05")),
        embed_pause=float(env.get("DEMO_EMBED_PAUSE", "0.3")),
    )


def serve(env):
    gateway_url = env.get("GATEWAY_URL") or f"http://127.0.0.1:{env.get('GATEWAY_PORT', '8080')}"
    products = json.loads(CATALOGUE.read_text(encoding="utf-8"))
    store = Store(gateway_url, env.get("DEMO_API_KEY", "demo-key"), settings_from_env(env), products)
    handler = type("StoreHandler", (Handler,), {"store": store})
    server = ThreadingHTTPServer(("127.0.0.1", int(env.get("DEMO_PORT", "8000"))), handler)
    server.daemon_threads = True
    return server, store


def main():
    server, store = serve(os.environ)
    store.start_pipeline()
    host, port = server.server_address[:2]
    print(f"demo store on http://{host}:{port}/ (gateway {store.gateway_url})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
