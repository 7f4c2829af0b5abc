"""Upstream faults: refused connections, an upstream that never answers, throttling and failed
conditional writes; and sidecar faults on the mirror (slow, erroring) that never fail a write."""

import json
import time
import uuid

import httpx
import pytest

from conftest import AUTH, BUSY_BODY, BUSY_HEADERS, EVICT_PATH, MIRROR_PATH, Gateway, free_port, wait_until

WRITE_TIMEOUT = "Turbopuffer did not answer in time; the write may or may not have applied"
READ_TIMEOUT = "Turbopuffer did not answer in time"


def test_connection_refused_is_502_upstream_error(stack):
    dead = Gateway(stack["procs"], "envoy-dead", f"http://127.0.0.1:{free_port()}", stack["sidecar_port"])
    try:
        r = httpx.post(f"{dead.url}/v2/namespaces/x", headers=AUTH, json={"upsert_rows": [{"id": 1}]})
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["error"] == "upstream_error"
        assert body["message"].startswith("could not reach Turbopuffer: ")
        assert dead.counter("hevlayer.upstream_error") == 1
    finally:
        stack["procs"].stop("envoy-dead")


# (method, path, body, message): the recorder's "hang" namespace never answers within the
# recorded gateway's 1 s route timeout.
TIMEOUTS = [
    ("POST", "/v2/namespaces/hang", {"deletes": [1]}, WRITE_TIMEOUT),
    ("POST", "/v2/namespaces/hang", {"upsert_rows": [{"id": 1, "t": "x"}]}, WRITE_TIMEOUT),
    ("DELETE", "/v2/namespaces/hang", None, WRITE_TIMEOUT),
    ("POST", "/v2/namespaces/hang/query", {"rank_by": ["id", "asc"], "top_k": 1}, READ_TIMEOUT),
    ("GET", "/v1/namespaces/hang/metadata", None, READ_TIMEOUT),
]


@pytest.mark.parametrize("method,path,body,message", TIMEOUTS, ids=[f"{m} {p}" for m, p, _, _ in TIMEOUTS])
def test_an_upstream_that_never_answers_is_504(stack, method, path, body, message):
    recorded = stack["recorded"]
    before = recorded.counter("hevlayer.gateway_timeout")
    r = httpx.request(method, f"{recorded.url}{path}", headers=AUTH, json=body, timeout=10)
    assert r.status_code == 504
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "gateway_timeout", "message": message}
    assert recorded.counter("hevlayer.gateway_timeout") == before + 1


def assert_relayed_429(r):
    assert r.status_code == 429
    assert r.content == BUSY_BODY, "the body is relayed verbatim"
    assert r.headers["content-type"] == "application/json"
    for name, value in BUSY_HEADERS.items():
        assert r.headers.get(name) == value, name


@pytest.mark.parametrize("path,body", [
    ("/v2/namespaces/busy", {"deletes": [1]}),
    ("/v2/namespaces/busy", {"upsert_rows": [{"id": 1, "t": "x"}]}),
    ("/v2/namespaces/busy/query", {"rank_by": ["id", "asc"], "top_k": 1}),
])
def test_429_is_relayed_with_its_headers(stack, path, body):
    r = httpx.post(f"{stack['recorded'].url}{path}", headers=AUTH, json=body)
    assert_relayed_429(r)


def test_a_failed_pipeline_vectors_write_relays_the_429_and_keeps_the_stage(stack):
    """The sidecar answers PUT .../vectors: its write to the target namespace goes through the
    gateway to the recorder, whose "busy" namespace throttles it."""
    gw, recorder = stack["recorded"].url, stack["recorder"]
    pid = f"pb-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{gw}/v2/pipelines", headers=AUTH, json={"id": pid, "target_namespace": "busy"})
    assert r.status_code in (200, 201), r.text
    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/d1", headers=AUTH, json={"chunks": [{"id": "c1", "text": "t"}]})
    assert r.status_code == 200, r.text
    assert httpx.post(f"{gw}/v2/pipelines/{pid}/claim", headers=AUTH, json={"worker_id": "w"}).json()["documents"] == ["d1"]
    mark = len(recorder.requests)
    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/d1/vectors", headers=AUTH,
                  json={"vectors": [{"id": "c1", "vector": [0.1, 0.2]}]})
    assert_relayed_429(r)
    # The write did go upstream, stamped, through the write path.
    received = recorder.since(mark)
    assert [(q.method, q.path) for q in received] == [("POST", "/v2/namespaces/busy")]
    row = json.loads(received[0].body)["upsert_rows"][0]
    assert row["id"] == "c1" and isinstance(row["_hevlayer_upserted_at"], int)
    # The document stays claimed: not indexed, still leased to its worker.
    status = httpx.get(f"{gw}/v2/pipelines/{pid}/status", headers=AUTH).json()
    assert status["counts"].get("embedding") == 1 and status["counts"].get("indexed", 0) == 0, status
    assert status["status"] == "waiting_on_upstream"
    beat = httpx.post(f"{gw}/v2/pipelines/{pid}/documents/heartbeat", headers=AUTH,
                      json={"worker_id": "w", "document_ids": ["d1"]}).json()
    assert beat["updated"] == 1
    httpx.delete(f"{gw}/v2/pipelines/{pid}", headers=AUTH).raise_for_status()


def test_a_failed_conditional_write_is_relayed_verbatim(stack):
    body = {"upsert_rows": [{"id": 1, "v": 2}], "upsert_condition": ["v", "Lt", {"$ref_new": "v"}]}
    r = httpx.post(f"{stack['recorded'].url}/v2/namespaces/conflict", headers=AUTH, json=body)
    assert r.status_code == 409
    assert r.json() == {"status": "error", "error": "condition failed for 1 document"}
    sent = stack["recorder"].requests[-1].body
    assert b'"return_affected_ids":true' in sent


@pytest.mark.parametrize("fault,counter", [(("delay", 3.0), "hevlayer.mirror_timeout"),
                                           (("status", 500), "hevlayer.mirror_failed")],
                         ids=["sidecar slow", "sidecar erroring"])
@pytest.mark.parametrize("path", [MIRROR_PATH, EVICT_PATH], ids=["mirror", "eviction ahead"])
def test_a_slow_or_erroring_sidecar_never_fails_a_write(keys_stack, fault, counter, path):
    """A callout the response waits for (the eviction ahead of a write) waits at most its timeout
    (200 ms by default); a mirror goes after the response. Either one's failure only counts (a
    failed eviction fences the write): the client gets the upstream's 2xx either way."""
    ks = keys_stack
    tap, gw = ks.tap, ks.gateway
    if path == EVICT_PATH:
        counter = "hevlayer.evict_ahead_failed"
    before, fenced = gw.counter(counter), gw.counter("hevlayer.evictions_acknowledged")
    tap.mirror_fault, tap.fault_path = fault, path
    try:
        started = time.monotonic()
        r = httpx.post(f"{gw.url}/v2/namespaces/e2e-fault-{uuid.uuid4().hex[:8]}",
                       headers={"authorization": f"Bearer {ks.keys['write']}"},
                       json={"upsert_rows": [{"id": 1, "t": "a"}]}, timeout=10)
        elapsed = time.monotonic() - started
        # A mirror after the response fails after the response: wait for its count.
        wait_until(lambda: gw.counter(counter) == before + 1, counter, seconds=10)
    finally:
        tap.mirror_fault, tap.fault_path = None, MIRROR_PATH
    assert r.status_code == 200, r.text
    assert r.json()["rows_affected"] == 1
    assert any(req.path.startswith(path) for req in tap.requests)
    if fault[0] == "delay":
        # Bounded by the callout timeout, not by the sidecar: far less than its 3 s delay.
        assert elapsed < 2.0, elapsed
    if path == EVICT_PATH:
        # The fenced write is evicted by the root context's retry, which the sidecar acknowledges.
        wait_until(lambda: gw.counter("hevlayer.evictions_acknowledged") > fenced, "the fence released", 10)


def test_a_healthy_sidecar_is_counted_as_mirrored_and_purged(keys_stack):
    """The counters tell a real mirror and purge from Envoy's own answers: the sidecar's JSON 2xx
    counts as done (and the fault cases above as failed or timed out)."""
    ks = keys_stack
    gw = ks.gateway
    name = f"e2e-fault-{uuid.uuid4().hex[:8]}"
    auth = {"authorization": f"Bearer {ks.keys['admin']}"}
    mirrored, purged = gw.counter("hevlayer.mirror_ok"), gw.counter("hevlayer.purge_ok")
    r = httpx.post(f"{gw.url}/v2/namespaces/{name}", headers=auth, json={"upsert_rows": [{"id": 1, "t": "a"}]})
    assert r.status_code == 200, r.text
    # The mirror goes after the response: counted when the sidecar answers.
    wait_until(lambda: gw.counter("hevlayer.mirror_ok") == mirrored + 1, "mirror_ok", seconds=10)
    r = httpx.delete(f"{gw.url}/v2/namespaces/{name}", headers=auth)
    assert r.status_code == 200, r.text
    assert gw.counter("hevlayer.purge_ok") == purged + 1
