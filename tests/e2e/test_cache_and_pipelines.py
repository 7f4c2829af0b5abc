"""The document cache mirror, document fetch and the pipeline API through the real Envoy, with the
side effects checked where they land (the sidecar's cache, minifugu)."""

import time
import uuid

import httpx

from conftest import AUTH, wait_until


def ns():
    return f"e2e-{uuid.uuid4().hex[:10]}"


def write(stack, namespace, body):
    r = httpx.post(f"{stack['main'].url}/v2/namespaces/{namespace}", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    return r


def fetch(stack, namespace, doc_id):
    return httpx.get(f"{stack['main'].url}/v2/namespaces/{namespace}/documents/{doc_id}", headers=AUTH)


def test_write_then_fetch_is_a_cache_hit_with_the_stamp(stack):
    # Numeric and string ids (a namespace holds one id type).
    for doc_id, title in [(1, "one"), ("s-1", "string id")]:
        name = ns()
        write(stack, name, {"upsert_rows": [{"id": doc_id, "title": title}]})
        r = fetch(stack, name, doc_id)
        assert r.status_code == 200, r.text
        assert r.headers["x-layer-cache"] == "hit"
        body = r.json()
        assert body["id"] == doc_id
        assert body["attributes"]["title"] == title
        assert isinstance(body["attributes"]["_hevlayer_upserted_at"], int)


def test_patch_merges_and_delete_evicts(stack):
    name = ns()
    write(stack, name, {"upsert_rows": [{"id": 1, "a": 1, "b": 1}]})
    write(stack, name, {"patch_rows": [{"id": 1, "b": 2}]})
    attrs = fetch(stack, name, 1).json()["attributes"]
    assert (attrs["a"], attrs["b"]) == (1, 2)
    write(stack, name, {"deletes": [1]})
    r = fetch(stack, name, 1)
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


def test_a_miss_is_fetched_from_turbopuffer_and_backfilled(stack):
    name = ns()
    r = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}", headers=AUTH, json={"upsert_rows": [{"id": 9, "t": "direct"}]})
    assert r.status_code == 200
    first = fetch(stack, name, 9)
    assert first.status_code == 200, first.text
    assert first.headers["x-layer-cache"] == "miss"
    assert first.json()["attributes"]["t"] == "direct"
    assert fetch(stack, name, 9).headers["x-layer-cache"] == "hit"


def test_filter_writes_affect_only_returned_ids_and_hide_ids_not_asked_for(stack):
    name = ns()
    write(stack, name, {"upsert_rows": [{"id": 1, "k": "x"}, {"id": 2, "k": "y"}]})
    r = write(stack, name, {"delete_by_filter": ["k", "Eq", "x"]})
    assert "deleted_ids" not in r.json()
    assert fetch(stack, name, 1).status_code == 404
    assert fetch(stack, name, 2).headers["x-layer-cache"] == "hit"
    r = write(stack, name, {"patch_by_filter": {"filters": ["k", "Eq", "y"], "patch": {"k": "z"}}, "return_affected_ids": True})
    assert r.json()["patched_ids"] == [2]
    # Patched by filter: evicted, then re-read from Turbopuffer with the new value.
    refetched = fetch(stack, name, 2)
    assert refetched.headers["x-layer-cache"] == "miss"
    assert refetched.json()["attributes"]["k"] == "z"


def test_namespace_delete_purges_the_cache(stack):
    name = ns()
    write(stack, name, {"upsert_rows": [{"id": 1, "t": "x"}]})
    assert httpx.delete(f"{stack['main'].url}/v2/namespaces/{name}", headers=AUTH).status_code == 200
    assert fetch(stack, name, 1).status_code == 404


def test_pipeline_lifecycle_through_the_gateway(stack):
    gw = stack["main"].url
    pid, target = f"p-{uuid.uuid4().hex[:8]}", ns()
    r = httpx.post(f"{gw}/v2/pipelines", headers=AUTH, json={"id": pid, "target_namespace": target})
    assert r.status_code in (200, 201), r.text
    assert httpx.post(f"{gw}/v2/pipelines", headers=AUTH, json={"id": pid, "target_namespace": target}).status_code == 409
    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/doc-1", headers=AUTH, json={"chunks": [{"id": "c1", "text": "hello"}, {"id": "c2", "text": "world"}]})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "pending" and r.json()["chunk_count"] == 2
    status = httpx.get(f"{gw}/v2/pipelines/{pid}/status", headers=AUTH).json()
    assert status["status"] == "pending" and status["pending_count"] == 1
    claim = httpx.post(f"{gw}/v2/pipelines/{pid}/claim", headers=AUTH, json={"worker_id": "w1"}).json()
    assert claim["documents"] == ["doc-1"]
    assert httpx.get(f"{gw}/v2/pipelines/{pid}/status", headers=AUTH).json()["status"] == "waiting_on_upstream"
    chunks = httpx.get(f"{gw}/v2/pipelines/{pid}/documents/doc-1/chunks", headers=AUTH).json()
    assert [c["id"] for c in chunks] == ["c1", "c2"]
    vectors = {"vectors": [{"id": "c1", "vector": [0.1, 0.2]}, {"id": "c2", "vector": [0.3, 0.4], "attributes": {"t": "w"}}]}
    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/doc-1/vectors", headers=AUTH, json=vectors)
    assert r.status_code == 200, r.text
    status = httpx.get(f"{gw}/v2/pipelines/{pid}/status", headers=AUTH).json()
    assert status["status"] == "idle" and status["counts"].get("indexed") == 1
    # The vectors landed in the target namespace through the stamped write path.
    rows = httpx.post(f"{stack['minifugu']}/v2/namespaces/{target}/query", headers=AUTH,
                      json={"rank_by": ["id", "asc"], "top_k": 10, "include_attributes": True}).json()["rows"]
    assert {r["id"] for r in rows} == {"c1", "c2"}
    assert all(isinstance(r["_hevlayer_upserted_at"], int) for r in rows)
    assert httpx.delete(f"{gw}/v2/pipelines/{pid}", headers=AUTH).status_code == 200
    assert httpx.get(f"{gw}/v2/pipelines/{pid}/status", headers=AUTH).status_code == 404


def test_bad_pipeline_bodies_are_json_422(stack):
    r = httpx.post(f"{stack['main'].url}/v2/pipelines", headers={**AUTH, "content-type": "application/json"}, content=b"{not json")
    assert r.status_code == 422
    assert r.json()["error"] == "validation_error"


def test_writes_succeed_with_the_sidecar_killed(stack):
    procs = stack["procs"]
    sidecar = procs.procs["sidecar"]
    argv = sidecar.args
    procs.stop("sidecar")
    try:
        name = ns()
        before = stack["main"].counter("hevlayer.mirror_failed")
        write(stack, name, {"upsert_rows": [{"id": 1, "t": "no cache"}]})
        assert stack["main"].counter("hevlayer.mirror_failed") == before + 1
        r = httpx.get(f"{stack['main'].url}/v2/pipelines", headers=AUTH)
        assert r.status_code == 503
        assert r.json()["error"] == "cache_unavailable"
    finally:
        procs.start("sidecar", argv)
        port = stack["sidecar_port"]
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, "sidecar restart")
    time.sleep(0.1)
