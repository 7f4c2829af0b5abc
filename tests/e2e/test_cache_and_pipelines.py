"""The document cache mirror, document fetch and the pipeline API through the real Envoy, with the
side effects checked where they land (the sidecar's cache, minifugu)."""

import time
import uuid

import httpx

from conftest import AUTH, wait_until


def ns():
    return f"e2e-{uuid.uuid4().hex[:10]}"


# The counters an accepted write ends in, exactly one each.
MIRROR_OUTCOMES = ("mirror_ok", "mirror_failed", "mirror_timeout", "mirror_skipped", "writes_unanswered")


def mirror_outcomes(gateway):
    return sum(gateway.counter(f"hevlayer.{name}") for name in MIRROR_OUTCOMES)


def write(stack, namespace, body):
    """A 2xx write, once its mirror had its outcome: mirrors go after the response (up to
    `mirror_linger_max_ms` later while writes keep coming), and these tests check what the cache then holds."""
    main = stack["main"]
    before = mirror_outcomes(main)
    r = httpx.post(f"{main.url}/v2/namespaces/{namespace}", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    wait_until(lambda: mirror_outcomes(main) > before, "the write's mirror outcome", seconds=10)
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
        # The cached stamp is the one Turbopuffer stored.
        stored = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}/query", headers=AUTH,
                            json={"rank_by": ["id", "asc"], "top_k": 1, "include_attributes": True}).json()["rows"][0]
        assert isinstance(stored["_hevlayer_upserted_at"], int)
        assert body["attributes"]["_hevlayer_upserted_at"] == stored["_hevlayer_upserted_at"]


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


def test_a_patch_right_after_an_upsert_is_never_lost_from_the_cache(stack):
    """The upsert's mirror goes after its response, up to `mirror_linger_max_ms` later; the patch's
    response waits for its own mirror, which can land first. Either way a fetch afterwards
    shows the patch (from the cache, or from Turbopuffer when the patch left no copy to merge
    into), never the upserted version without it."""
    name, main = ns(), stack["main"]
    before = mirror_outcomes(main)
    # One connection, so that the patch follows the upsert's response as closely as it can.
    with httpx.Client(base_url=main.url, headers=AUTH) as client:
        for i in range(20):
            r = client.post(f"/v2/namespaces/{name}", json={"upsert_rows": [{"id": i, "a": 1, "b": 1}]})
            assert r.status_code == 200, r.text
            r = client.post(f"/v2/namespaces/{name}", json={"patch_rows": [{"id": i, "b": 2}]})
            assert r.status_code == 200, r.text
    wait_until(lambda: mirror_outcomes(main) >= before + 40, "every mirror's outcome", seconds=10)
    for i in range(20):
        attrs = fetch(stack, name, i).json()["attributes"]
        assert (attrs["a"], attrs["b"]) == (1, 2), i


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


def cached(stack, namespace, doc_id):
    """(x-layer-cache, attributes without the stamp) of a fetch, or (None, status) when it is not 200."""
    r = fetch(stack, namespace, doc_id)
    if r.status_code != 200:
        return None, r.status_code
    attrs = dict(r.json()["attributes"])
    assert isinstance(attrs.pop("_hevlayer_upserted_at", 0), int)
    return r.headers["x-layer-cache"], attrs


def test_conditional_writes_affect_only_the_ids_turbopuffer_returns(stack):
    """minifugu 0.2.1 applies plain conditions (not `$ref_new`) and, with return_affected_ids,
    lists the ids it changed; a missing document is upserted whatever the condition."""
    name, main = ns(), stack["main"]
    write(stack, name, {"upsert_rows": [{"id": 1, "v": 1, "k": "a"}, {"id": 2, "v": 5, "k": "b"}, {"id": 3, "v": 1, "k": "c"}]})
    # Written behind the gateway's back: Turbopuffer has it, the cache does not.
    r = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}", headers=AUTH, json={"upsert_rows": [{"id": 5, "v": 9, "k": "d"}]})
    assert r.status_code == 200, r.text
    stripped = main.counter("hevlayer.affected_ids_stripped")

    # Upsert where v < 3: id 1 (v=1) and the new id 4 apply; id 2 (v=5) and id 5 (v=9) do not.
    r = write(stack, name, {"upsert_rows": [{"id": i, "v": 2, "k": "new"} for i in (1, 2, 4, 5)], "upsert_condition": ["v", "Lt", 3]})
    body = r.json()
    assert body["rows_affected"] == 2
    assert not {"upserted_ids", "patched_ids", "deleted_ids"} & body.keys(), "the client did not ask for ids"
    assert main.counter("hevlayer.affected_ids_stripped") == stripped + 1, "the gateway asked for them and removed them"
    assert cached(stack, name, 1) == ("hit", {"v": 2, "k": "new"})
    assert cached(stack, name, 4) == ("hit", {"v": 2, "k": "new"})
    assert cached(stack, name, 2) == ("hit", {"v": 5, "k": "b"}), "a failed condition leaves the cached document alone"
    # Not cached, and the write did not apply to it: no phantom document, read from Turbopuffer.
    assert cached(stack, name, 5) == ("miss", {"v": 9, "k": "d"})

    # Patch where v > 1 (now 1: v=2, 2: v=5, 3: v=1), asking for the ids.
    r = write(stack, name, {"patch_rows": [{"id": i, "k": "patched"} for i in (1, 2, 3)], "patch_condition": ["v", "Gt", 1],
                            "return_affected_ids": True})
    body = r.json()
    assert sorted(body["patched_ids"]) == [1, 2]
    assert cached(stack, name, 1) == ("hit", {"v": 2, "k": "patched"})
    assert cached(stack, name, 2) == ("hit", {"v": 5, "k": "patched"})
    assert cached(stack, name, 3) == ("hit", {"v": 1, "k": "c"})

    # What Turbopuffer holds agrees with the cache.
    rows = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}/query", headers=AUTH,
                      json={"rank_by": ["id", "asc"], "top_k": 10, "include_attributes": ["v", "k"]}).json()["rows"]
    assert {r["id"]: (r["v"], r["k"]) for r in rows} == {1: (2, "patched"), 2: (5, "patched"), 3: (1, "c"), 4: (2, "new"), 5: (9, "d")}


def test_conditional_deletes_evict_only_the_ids_turbopuffer_deleted(stack):
    name = ns()
    write(stack, name, {"upsert_rows": [{"id": 1, "v": 1}, {"id": 2, "v": 2}, {"id": 3, "v": 1}, {"id": 4, "v": 2}]})
    # Delete where v == 1: of ids 1 and 2 only 1 goes; no ids asked for, none shown.
    r = write(stack, name, {"deletes": [1, 2], "delete_condition": ["v", "Eq", 1]})
    body = r.json()
    assert body["rows_affected"] == 1
    assert "deleted_ids" not in body
    assert cached(stack, name, 1) == (None, 404)
    # SPEC 2.5: effects apply only to the ids Turbopuffer returns, so id 2 stays cached.
    assert cached(stack, name, 2) == ("hit", {"v": 2})
    # Asked for, the ids are relayed as Turbopuffer sent them.
    r = write(stack, name, {"deletes": [3, 4], "delete_condition": ["v", "Eq", 2], "return_affected_ids": True})
    assert r.json()["deleted_ids"] == [4]
    assert cached(stack, name, 4) == (None, 404)
    assert cached(stack, name, 3) == ("hit", {"v": 1})
    rows = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}/query", headers=AUTH,
                      json={"rank_by": ["id", "asc"], "top_k": 10, "include_attributes": ["v"]}).json()["rows"]
    assert {r["id"]: r["v"] for r in rows} == {2: 2, 3: 1}


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


def test_a_large_document_is_staged_and_read_back_through_the_gateway(stack):
    """A 20 MB document goes to the sidecar in the stage callout and comes back in the chunks
    callout's answer: nothing in Envoy's callout path truncates or refuses it."""
    gw = stack["main"].url
    pid = f"p-{uuid.uuid4().hex[:8]}"
    assert httpx.post(f"{gw}/v2/pipelines", headers=AUTH, json={"id": pid, "target_namespace": ns()}).status_code == 201
    chunks = [{"id": f"c{i}", "text": f"{i:08d}" + "x" * (200_000 - 8)} for i in range(100)]
    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/big", headers=AUTH, json={"chunks": chunks}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["chunk_count"] == 100
    r = httpx.get(f"{gw}/v2/pipelines/{pid}/documents/big/chunks", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text[:200]
    assert r.json() == chunks
    assert httpx.delete(f"{gw}/v2/pipelines/{pid}", headers=AUTH).status_code == 200


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
