"""Upstream faults: refused connections, an upstream that never answers, throttling and failed
conditional writes."""

import httpx

from conftest import AUTH, Gateway, free_port


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


def test_an_upstream_that_never_answers_is_504(stack):
    r = httpx.post(f"{stack['recorded'].url}/v2/namespaces/hang", headers=AUTH, json={"deletes": [1]}, timeout=10)
    assert r.status_code == 504
    assert r.json()["error"] == "gateway_timeout"


def test_429_is_relayed_with_its_headers(stack):
    r = httpx.post(f"{stack['recorded'].url}/v2/namespaces/busy", headers=AUTH, json={"deletes": [1]})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert r.json() == {"status": "error", "error": "slow down"}


def test_a_failed_conditional_write_is_relayed_verbatim(stack):
    body = {"upsert_rows": [{"id": 1, "v": 2}], "upsert_condition": ["v", "Lt", {"$ref_new": "v"}]}
    r = httpx.post(f"{stack['recorded'].url}/v2/namespaces/conflict", headers=AUTH, json=body)
    assert r.status_code == 409
    assert r.json() == {"status": "error", "error": "condition failed for 1 document"}
    sent = stack["recorder"].requests[-1][3]
    assert b'"return_affected_ids":true' in sent
