"""The write path through the real Envoy: stamping lands in minifugu, rejections never leave the
gateway, limits, gzip, HTTP/2 with and without trailers, big bodies, passthrough routes."""

import gzip
import json
import socket
import time
import uuid

import h2.connection
import h2.events
import httpx
import pytest

from conftest import AUTH, raw_request


def ns():
    return f"e2e-{uuid.uuid4().hex[:10]}"


def query_all(stack, namespace):
    r = httpx.post(
        f"{stack['minifugu']}/v2/namespaces/{namespace}/query",
        headers=AUTH,
        json={"rank_by": ["id", "asc"], "top_k": 100, "include_attributes": True},
    )
    assert r.status_code == 200, r.text
    return {row["id"]: row for row in r.json()["rows"]}


def test_accepted_writes_land_stamped(stack):
    name = ns()
    before = int(time.time() * 1000)
    r = httpx.post(
        f"{stack['main'].url}/v2/namespaces/{name}",
        headers=AUTH,
        json={"upsert_rows": [{"id": 1, "title": "a"}, {"id": 2, "title": "b", "_hevlayer_upserted_at": 5}]},
    )
    after = int(time.time() * 1000)
    assert r.status_code == 200, r.text
    assert r.json()["rows_affected"] == 2
    rows = query_all(stack, name)
    stamps = {rows[1]["_hevlayer_upserted_at"], rows[2]["_hevlayer_upserted_at"]}
    assert len(stamps) == 1, "one stamp per request"
    assert before <= stamps.pop() <= after
    r = httpx.post(
        f"{stack['main'].url}/v2/namespaces/{name}",
        headers=AUTH,
        json={"upsert_columns": {"id": [3, 4], "title": ["c", "d"]}, "patch_rows": [{"id": 1, "title": "a2"}]},
    )
    assert r.status_code == 200, r.text
    rows = query_all(stack, name)
    assert rows[1]["title"] == "a2" and rows[1]["_hevlayer_upserted_at"] == rows[3]["_hevlayer_upserted_at"]
    assert isinstance(rows[4]["_hevlayer_upserted_at"], int)


REJECTIONS = [
    (b'{"upsert_rows": [', "request body is not valid JSON: unexpected end of input at byte 17"),
    (b"{}", "Request must include a native Turbopuffer write operation"),
    (b'{"upserts": [{"id": 1}]}', "custom write bodies were removed; use native Turbopuffer write keys such as upsert_rows, patch_rows, patch_columns, and deletes"),
    (b'{"upsert_rows": [{"id": 1, "blobs": {}}]}', "document blob writes are no longer supported; store binary payloads externally and write an ordinary attribute with that location"),
    (b'{"upsert_rows": [{"id": 1, "_hevlayer_secret": 1}]}', "attribute '_hevlayer_secret' uses the reserved _hevlayer_* prefix"),
    (b'{"patch_rows": [{"id": 1, "vector": [1.0]}]}', "patch_rows cannot patch vector or vectors values; upsert full rows instead"),
    (b'{"upsert_columns": {"id": [1, 2], "a": [1]}}', "upsert_columns column 'a' has 1 values for 2 ids"),
    # One meaning per body: what parsers could read differently is refused.
    (b'{"upsert_rows":[{"id":1,"id":2,"a":1}]}', "member 'id' appears twice in an upsert_rows entry (again at byte 24)"),
    (b'{"upsert_rows":[{"id":1}],"upsert_rows":[{"id":2}]}', "member 'upsert_rows' appears twice in the request body (again at byte 26)"),
    (b'{"upsert_rows":[{"id":1,"t":"\\ud800"}]}', "request body is not valid JSON: lone surrogate in \\u escape at byte 29"),
    (b'{"upsert_rows":[{"id":1,"n":1e999999}]}', "request body is not valid JSON: number out of range at byte 28"),
]


@pytest.mark.parametrize("body,message", REJECTIONS)
def test_rejections_are_answered_by_the_gateway_alone(stack, body, message):
    recorder = stack["recorder"]
    seen = len(recorder.requests)
    r = httpx.post(f"{stack['recorded'].url}/v2/namespaces/{ns()}", headers={**AUTH, "content-type": "application/json"}, content=body)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "validation_error", "message": message}
    assert len(recorder.requests) == seen, "the upstream must receive nothing"


def test_413_from_content_length_before_any_body(stack):
    """Only the head is sent, announcing 300 MB (over the 256 MiB default limit): the filter answers
    at once, from content-length, and nothing reaches the upstream."""
    recorded, recorder = stack["recorded"], stack["recorder"]
    mark, before = len(recorder.requests), recorded.counter("hevlayer.payload_too_large")
    head = (
        f"POST /v2/namespaces/{ns()} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer e2e-key\r\n"
        "content-type: application/json\r\ncontent-length: 300000000\r\n\r\n"
    ).encode()
    status, headers, body = raw_request(recorded.port, head)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "error": "payload_too_large",
        "message": "request body exceeds the gateway limit of 268435456 bytes",
    }
    assert recorded.counter("hevlayer.payload_too_large") == before + 1, "the filter answered, not Envoy"
    assert recorder.since(mark) == [], "the upstream must receive nothing"


def test_413_from_the_running_size(stack, tmp_path):
    from conftest import Gateway

    small = Gateway(stack["procs"], "envoy-small", stack["recorder"].url, stack["sidecar_port"], MAX_BODY_BYTES="65536")
    try:
        def chunks():
            yield b'{"upsert_rows": [{"id": 1, "t": "'
            for _ in range(40):
                yield b"x" * 4096
            yield b'"}]}'

        mark = len(stack["recorder"].requests)
        r = httpx.post(f"{small.url}/v2/namespaces/{ns()}", headers=AUTH, content=chunks())
        assert r.status_code == 413
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": "payload_too_large", "message": "request body exceeds the gateway limit of 65536 bytes"}
        assert small.counter("hevlayer.payload_too_large") == 1
        assert stack["recorder"].since(mark) == [], "the upstream must receive nothing"
    finally:
        stack["procs"].stop("envoy-small")


def test_gzip_bodies_are_decoded(stack):
    name = ns()
    body = gzip.compress(json.dumps({"upsert_rows": [{"id": 7, "title": "zipped"}]}).encode())
    r = httpx.post(
        f"{stack['main'].url}/v2/namespaces/{name}",
        headers={**AUTH, "content-encoding": "gzip", "content-type": "application/json"},
        content=body,
    )
    # minifugu refuses gzip bodies: a 200 means the gateway decoded it.
    assert r.status_code == 200, r.text
    assert query_all(stack, name)[7]["title"] == "zipped"


def test_http2_h2c(stack):
    name = ns()
    with httpx.Client(http1=False, http2=True) as client:
        r = client.post(f"{stack['main'].url}/v2/namespaces/{name}", headers=AUTH, json={"upsert_rows": [{"id": 1, "v": 1}]})
        assert r.http_version == "HTTP/2"
        assert r.status_code == 200, r.text
    assert "_hevlayer_upserted_at" in query_all(stack, name)[1]


def h2_post_with_trailers(port, path, body: bytes):
    """An HTTP/2 (prior knowledge) POST whose body ends with trailers, not an END_STREAM data frame."""
    conn = h2.connection.H2Connection()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        headers = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gw"),
                   ("authorization", "Bearer e2e-key"), ("content-type", "application/json")]
        conn.send_headers(1, headers)
        for i in range(0, len(body), 1000):
            conn.send_data(1, body[i:i + 1000])
        conn.send_headers(1, [("x-trailer", "done")], end_stream=True)
        s.sendall(conn.data_to_send())
        status, data = None, b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, data
            s.sendall(conn.data_to_send())
        return status, data


def test_http2_with_trailers(stack):
    name = ns()
    body = json.dumps({"upsert_rows": [{"id": i, "t": "x" * 50} for i in range(50)]}).encode()
    status, data = h2_post_with_trailers(stack["main"].port, f"/v2/namespaces/{name}", body)
    assert status == 200, data
    rows = query_all(stack, name)
    assert len(rows) == 50 and all("_hevlayer_upserted_at" in r for r in rows.values())


def test_a_50_mb_write_is_accepted(stack):
    recorder = stack["recorder"]
    row = {"id": 0, "vector": "A" * 8192, "t": "big"}
    rows = []
    for i in range(6200):
        rows.append(dict(row, id=i))
    body = json.dumps({"upsert_rows": rows}).encode()
    assert len(body) > 50_000_000
    r = httpx.post(f"{stack['recorded'].url}/v2/namespaces/{ns()}", headers=AUTH, content=body, timeout=60)
    assert r.status_code == 200, r.text[:300]
    received = recorder.requests[-1].body
    assert len(received) > len(body)
    assert received.count(b'"_hevlayer_upserted_at":') == 6200


def test_passthrough_routes_are_untouched(stack):
    name = ns()
    httpx.post(f"{stack['main'].url}/v2/namespaces/{name}", headers=AUTH, json={"upsert_rows": [{"id": 1, "a": 1}]}).raise_for_status()
    q = {"rank_by": ["id", "asc"], "top_k": 5, "include_attributes": ["a"]}
    via = httpx.post(f"{stack['main'].url}/v2/namespaces/{name}/query", headers=AUTH, json=q)
    direct = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}/query", headers=AUTH, json=q)
    assert via.status_code == direct.status_code == 200
    assert via.json()["rows"] == direct.json()["rows"]
    meta = httpx.get(f"{stack['main'].url}/v1/namespaces/{name}/metadata", headers=AUTH)
    assert meta.status_code == httpx.get(f"{stack['minifugu']}/v1/namespaces/{name}/metadata", headers=AUTH).status_code
    r = httpx.delete(f"{stack['main'].url}/v2/namespaces/{name}", headers=AUTH)
    assert r.status_code == 200, r.text
    gone = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}/query", headers=AUTH, json=q)
    assert gone.status_code == 404


def test_passthrough_requests_reach_turbopuffer_byte_for_byte(stack):
    """What the upstream receives on a passthrough route is what the client sent (method, path with
    its query string, body bytes, key), and what it answers comes back unchanged."""
    gw, recorder = stack["recorded"].url, stack["recorder"]
    name = ns()
    query = b'{ "rank_by" : ["id","asc"],\n "top_k":1.50e1, "filters":["a","Eq",1] }'
    cases = [
        ("POST", f"/v2/namespaces/{name}/query?stainless_overload=x", query,
         json.dumps({"rows": [], "billing": {}}).encode()),
        ("GET", f"/v1/namespaces/{name}/metadata", b"", None),
        ("GET", "/v1/namespaces?prefix=e2e&page_size=2", b"", None),
        ("DELETE", f"/v2/namespaces/{name}", b"", None),
    ]
    default = json.dumps({"status": "OK", "message": "ok", "rows_affected": 1, "upserted_ids": [1],
                          "deleted_ids": [2], "billing": {}}).encode()
    for method, path, body, answer in cases:
        mark = len(recorder.requests)
        r = httpx.request(method, f"{gw}{path}", headers={**AUTH, "content-type": "application/json"}, content=body)
        assert r.status_code == 200, (path, r.text)
        assert r.content == (answer or default), path
        received = recorder.since(mark)
        assert len(received) == 1, path
        got = received[0]
        assert (got.method, got.path, got.body) == (method, path, body)
        assert got.headers["authorization"] == AUTH["authorization"]


def test_missing_bearer_is_401_json(stack):
    r = httpx.post(f"{stack['main'].url}/v2/namespaces/{ns()}/query", json={})
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "unauthorized", "message": "missing or malformed Authorization: Bearer header"}
