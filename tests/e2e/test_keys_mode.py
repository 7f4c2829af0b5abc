"""`keys` mode end to end (SPEC §1): callers present gateway keys with scopes, Turbopuffer only ever
sees the gateway's upstream key, and neither Turbopuffer nor the sidecar ever sees a caller's key.

The gateway stands in front of the recording stand-in upstream (so each request's exact
`Authorization` is visible) and its sidecar behind a recording tap (so what the sidecar was sent is
visible too)."""

import json
import uuid

import httpx
import pytest

from conftest import wait_until


def ns():
    return f"e2e-keys-{uuid.uuid4().hex[:10]}"


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def assert_upstream_saw_only_the_upstream_key(ks, requests):
    """Every request carries exactly one Authorization, the upstream key, and no caller's or
    sidecar's key shows up anywhere in what the upstream received."""
    assert requests, "the upstream received nothing"
    for r in requests:
        assert r.headers.get_all("authorization") == [f"Bearer {ks.upstream_key}"], (r.method, r.path)
        seen = str(r.headers).encode() + r.body
        for key in [*ks.keys.values(), ks.sidecar_key]:
            assert key.encode() not in seen, (r.method, r.path, key)


def assert_sidecar_never_saw_a_caller_key(ks, requests):
    for r in requests:
        seen = str(r.headers).encode() + r.body
        for key in ks.keys.values():
            assert key.encode() not in seen, (r.method, r.path)


# (method, path, scope of the caller's key, JSON body). Every route reaches the upstream.
UPSTREAM_ROUTES = [
    ("POST", "/v2/namespaces/{ns}", "write", {"upsert_rows": [{"id": 1, "t": "a"}]}),
    ("POST", "/v2/namespaces/{ns}", "admin", {"deletes": [1]}),
    ("POST", "/v2/namespaces/{ns}", "write", {"patch_rows": [{"id": 1, "t": "b"}], "patch_condition": ["t", "Eq", "a"]}),
    ("POST", "/v2/namespaces/{ns}/query", "read", {"rank_by": ["id", "asc"], "top_k": 1}),
    ("POST", "/v2/namespaces/{ns}/multi_query", "read", {"queries": []}),
    ("GET", "/v1/namespaces/{ns}/metadata", "read", None),
    ("DELETE", "/v2/namespaces/{ns}", "write", None),
    # Outside /v1 and /v2: Envoy routes every path to Turbopuffer, so these are authenticated
    # and re-keyed too.
    ("GET", "/", "read", None),
    ("GET", "/healthz-ish", "read", None),
    ("POST", "/v3/namespaces/{ns}", "write", {"anything": 1}),
]


@pytest.mark.parametrize("method,path,scope,body", UPSTREAM_ROUTES, ids=[f"{m} {p} ({s})" for m, p, s, _ in UPSTREAM_ROUTES])
def test_the_upstream_only_ever_gets_the_upstream_key(keys_stack, method, path, scope, body):
    ks = keys_stack
    path = path.format(ns=ns())
    mark, tap_mark = len(ks.recorder.requests), len(ks.tap.requests)
    r = httpx.request(method, f"{ks.gateway.url}{path}", headers=bearer(ks.keys[scope]), json=body)
    assert r.status_code == 200, r.text
    received = ks.recorder.since(mark)
    assert [(q.method, q.path) for q in received] == [(method, path)]
    assert_upstream_saw_only_the_upstream_key(ks, received)
    if path.startswith("/v2/namespaces/") and method == "POST" and "upsert_rows" in body:
        assert b'"_hevlayer_upserted_at":' in received[0].body, "writes are still stamped in keys mode"
    # Writes are mirrored and namespace deletes purged: the sidecar gets those, never the key.
    assert_sidecar_never_saw_a_caller_key(ks, ks.tap.requests[tap_mark:])


def test_pipeline_vectors_go_upstream_with_the_upstream_key_and_the_sidecar_never_sees_the_callers(keys_stack):
    ks, gw = keys_stack, keys_stack.gateway.url
    pid, target = f"pk-{uuid.uuid4().hex[:8]}", ns()
    mark, tap_mark = len(ks.recorder.requests), len(ks.tap.requests)
    r = httpx.post(f"{gw}/v2/pipelines", headers=bearer(ks.keys["admin"]), json={"id": pid, "target_namespace": target})
    assert r.status_code in (200, 201), r.text
    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/d1", headers=bearer(ks.keys["write"]),
                  json={"chunks": [{"id": "c1", "text": "hello"}]})
    assert r.status_code == 200, r.text
    claimed = httpx.post(f"{gw}/v2/pipelines/{pid}/claim", headers=bearer(ks.keys["write"]), json={"worker_id": "w"})
    assert claimed.json()["documents"] == ["d1"], claimed.text
    assert ks.recorder.since(mark) == [], "staging and claiming never reach Turbopuffer"

    r = httpx.put(f"{gw}/v2/pipelines/{pid}/documents/d1/vectors", headers=bearer(ks.keys["write"]),
                  json={"vectors": [{"id": "c1", "vector": [0.1, 0.2], "attributes": {"t": "x"}}]})
    assert r.status_code == 200, r.text
    # The sidecar wrote the vectors through the gateway (with its own key, which the gateway
    # accepted and replaced): the upstream got one stamped write, with the upstream key.
    received = ks.recorder.since(mark)
    assert [(q.method, q.path) for q in received] == [("POST", f"/v2/namespaces/{target}")]
    write = json.loads(received[0].body)
    assert [row["id"] for row in write["upsert_rows"]] == ["c1"]
    assert isinstance(write["upsert_rows"][0]["_hevlayer_upserted_at"], int)
    assert_upstream_saw_only_the_upstream_key(ks, received)
    status = httpx.get(f"{gw}/v2/pipelines/{pid}/status", headers=bearer(ks.keys["read"])).json()
    assert status["counts"].get("indexed") == 1 and status["status"] == "idle", status

    # The sidecar's write is mirrored like any write: its eviction with the write, its mirror
    # (in a batch) after the response.
    def mirrored():
        return ("POST", "/internal/v1/mirrors") in [(q.method, q.path) for q in ks.tap.requests[tap_mark:]]

    wait_until(mirrored, "the mirror of the sidecar's write", seconds=10)
    sidecar_saw = ks.tap.requests[tap_mark:]
    paths = [(q.method, q.path) for q in sidecar_saw]
    assert ("PUT", f"/v2/pipelines/{pid}/documents/d1/vectors") in paths
    assert ("POST", "/internal/v1/evict") in paths, "the sidecar's write was evicted ahead like any write"
    assert_sidecar_never_saw_a_caller_key(ks, sidecar_saw)
    assert all(q.headers.get("authorization") is None for q in sidecar_saw), "keys mode forwards no bearer to the sidecar"


def test_a_fetch_miss_goes_upstream_with_the_upstream_key(keys_stack):
    ks = keys_stack
    name = ns()
    mark, tap_mark = len(ks.recorder.requests), len(ks.tap.requests)
    url = f"{ks.gateway.url}/v2/namespaces/{name}/documents/doc-7"
    r = httpx.get(url, headers=bearer(ks.keys["read"]))
    assert r.status_code == 200, r.text
    assert r.headers["x-layer-cache"] == "miss"
    assert r.json() == {"id": "doc-7", "attributes": {"source": "recorder"}}
    received = ks.recorder.since(mark)
    assert [(q.method, q.path) for q in received] == [("POST", f"/v2/namespaces/{name}/query")]
    assert json.loads(received[0].body)["filters"] == ["id", "Eq", "doc-7"]
    assert_upstream_saw_only_the_upstream_key(ks, received)
    # Backfilled: the second fetch is answered from the cache, nothing goes upstream.
    again = httpx.get(url, headers=bearer(ks.keys["read"]))
    assert again.headers["x-layer-cache"] == "hit"
    assert len(ks.recorder.requests) == mark + 1
    assert_sidecar_never_saw_a_caller_key(ks, ks.tap.requests[tap_mark:])


UNAUTHORIZED = {"error": "unauthorized", "message": "missing or malformed Authorization: Bearer header"}

# (method, path, headers, JSON body, status, expected JSON body or the required scope)
REFUSALS = [
    ("POST", "/v2/namespaces/{ns}", {}, {"upsert_rows": [{"id": 1}]}, 401, UNAUTHORIZED),
    ("POST", "/v2/namespaces/{ns}/query", {"authorization": "bearer {read}"}, {}, 401, UNAUTHORIZED),
    ("POST", "/v2/namespaces/{ns}/query", {"authorization": "Bearer"}, {}, 401, UNAUTHORIZED),
    ("GET", "/v2/pipelines", {"authorization": "Basic {admin}"}, None, 401, UNAUTHORIZED),
    ("GET", "/healthz-ish", {}, None, 401, UNAUTHORIZED),
    ("POST", "/v2/namespaces/{ns}", {"authorization": "Bearer not-a-gateway-key"}, {"upsert_rows": [{"id": 1}]}, 403, None),
    # The upstream key is not a gateway key.
    ("POST", "/v2/namespaces/{ns}/query", {"authorization": "Bearer {upstream}"}, {}, 403, None),
    ("POST", "/v2/namespaces/{ns}", {"authorization": "Bearer {read}"}, {"upsert_rows": [{"id": 1}]}, 403, "write"),
    ("DELETE", "/v2/namespaces/{ns}", {"authorization": "Bearer {read}"}, None, 403, "write"),
    ("PUT", "/v2/pipelines/p/documents/d", {"authorization": "Bearer {read}"}, {"chunks": []}, 403, "write"),
    ("POST", "/v2/pipelines", {"authorization": "Bearer {read}"}, {"id": "p", "target_namespace": "t"}, 403, "admin"),
    ("POST", "/v2/pipelines", {"authorization": "Bearer {write}"}, {"id": "p", "target_namespace": "t"}, 403, "admin"),
    ("DELETE", "/v2/pipelines/p", {"authorization": "Bearer {write}"}, None, 403, "admin"),
    # `write` does not imply `read`.
    ("POST", "/v2/namespaces/{ns}/query", {"authorization": "Bearer {write}"}, {}, 403, "read"),
    ("GET", "/v2/namespaces/{ns}/documents/1", {"authorization": "Bearer {write}"}, None, 403, "read"),
]


@pytest.mark.parametrize("method,path,headers,body,status,expected", REFUSALS,
                         ids=[f"{m} {p} {list(h.values())} -> {s}" for m, p, h, _, s, _ in REFUSALS])
def test_refusals_are_answered_by_the_gateway_alone(keys_stack, method, path, headers, body, status, expected):
    ks = keys_stack
    secrets = {**ks.keys, "upstream": ks.upstream_key}
    headers = {k: v.format(**secrets) for k, v in headers.items()}
    mark, tap_mark = len(ks.recorder.requests), len(ks.tap.requests)
    r = httpx.request(method, f"{ks.gateway.url}{path.format(ns=ns())}", headers=headers, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    if status == 401:
        assert answer == expected
    else:
        assert answer["error"] == "forbidden"
        assert isinstance(answer["message"], str) and answer["message"]
        if expected is None:
            assert "required_scope" not in answer, "an unknown key is not a scope problem"
        else:
            assert answer["required_scope"] == expected
    assert ks.recorder.since(mark) == [], "the upstream must receive nothing"
    assert ks.tap.requests[tap_mark:] == [], "the sidecar must receive nothing"
