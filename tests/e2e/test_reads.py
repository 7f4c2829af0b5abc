"""Reads by the stamp through the real Envoy: as_of and between with the official clients against
minifugu, the read watermark against a stand-in that reports its index updating, and queries that
the rules leave alone reaching Turbopuffer byte for byte."""

import asyncio
import json
import time
import uuid

import httpx
import pytest

from conftest import AUTH


def ns(prefix="e2e-read"):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bounded(check, what, seconds=15.0, every=0.1):
    """Calls `check` until it returns something truthy (returned), at most `seconds`."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what} not seen in {seconds}s (last: {last!r})")


def write_batches(url, name, batches):
    """Writes each batch of ids in its own request, a few ms apart, so each gets its own stamp."""
    for ids in batches:
        rows = [{"id": i, "vector": [0.1 * i, 0.2], "n": i} for i in ids]
        r = httpx.post(f"{url}/v2/namespaces/{name}", headers=AUTH,
                       json={"upsert_rows": rows, "distance_metric": "cosine_distance"})
        assert r.status_code == 200, r.text
        time.sleep(0.005)


def stamps_by_id(stack, name):
    r = httpx.post(f"{stack['minifugu']}/v2/namespaces/{name}/query", headers=AUTH,
                   json={"rank_by": ["id", "asc"], "top_k": 100, "include_attributes": ["_hevlayer_upserted_at"]})
    assert r.status_code == 200, r.text
    return {row["id"]: row["_hevlayer_upserted_at"] for row in r.json()["rows"]}


def test_hevlayer_client_as_of_and_between_return_exactly_the_rows_stamped_in_the_window(stack):
    from hevlayer import AsyncHevlayer

    main = stack["main"]
    name = ns()
    write_batches(main.url, name, [[1, 2], [3, 4], [5, 6]])
    stamps = stamps_by_id(stack, name)
    s1, s2, s3 = stamps[1], stamps[3], stamps[5]
    assert s1 < s2 < s3 and stamps[2] == s1 and stamps[4] == s2 and stamps[6] == s3
    temporal_before = main.counter("hevlayer.queries_rewritten.temporal")

    async def run():
        client = AsyncHevlayer(api_key="e2e-key", base_url=main.url)
        query = {"rank_by": ["id", "asc"], "top_k": 10, "include_attributes": ["n"]}

        async def ids(extra):
            result = await client.query_namespace(name, {**query, **extra})
            return [row["id"] for row in result.rows], result

        assert (await ids({"as_of": s1}))[0] == [1, 2]
        assert (await ids({"as_of": s2}))[0] == [1, 2, 3, 4]
        assert (await ids({"as_of": s3}))[0] == [1, 2, 3, 4, 5, 6]
        assert (await ids({"as_of": s1 - 1}))[0] == []
        assert (await ids({"between": [s1, s2]}))[0] == [3, 4]
        assert (await ids({"between": [s1, s3]}))[0] == [3, 4, 5, 6]
        assert (await ids({"between": [s2, s2]}))[0] == []
        # With a caller filter too: both must hold.
        assert (await ids({"as_of": s2, "filters": ["id", "In", [1, 3, 5]]}))[0] == [1, 3]
        assert (await ids({"between": [s1, s3], "filters": ["Or", [["n", "Eq", 2], ["n", "Eq", 6]]]}))[0] == [6]
        # A vector query with a window.
        ranked, _ = await ids({"rank_by": ["vector", "ANN", [0.6, 0.2]], "as_of": s2})
        assert sorted(ranked) == [1, 2, 3, 4]
        # The namespace was written and queried through the gateway: its watermark becomes known
        # (the sidecar polls minifugu's metadata) and the client reads it into stable_as_of.
        result = None

        async def stable():
            nonlocal result
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                _, result = await ids({})
                if result.stable_as_of is not None:
                    return result.stable_as_of
                await asyncio.sleep(0.2)
            raise AssertionError("stable_as_of never set")

        stable_as_of = await stable()
        now = int(time.time() * 1000)
        assert s3 - 1000 <= stable_as_of <= now - 500, (stable_as_of, s3, now)

        from hevlayer import HevlayerError
        with pytest.raises(HevlayerError) as bad:
            await client.query_namespace(name, {**query, "as_of": -5})
        assert bad.value.status_code == 422
        with pytest.raises(HevlayerError) as both:
            await client.query_namespace(name, {**query, "as_of": s1, "between": [s1, s2]})
        assert both.value.status_code == 422

    asyncio.run(run())
    assert main.counter("hevlayer.queries_rewritten.temporal") - temporal_before >= 10


def test_multi_queries_apply_windows_per_sub_query(stack):
    main = stack["main"]
    name = ns()
    write_batches(main.url, name, [[1], [2], [3]])
    stamps = stamps_by_id(stack, name)
    body = {"queries": [
        {"rank_by": ["id", "asc"], "top_k": 10, "as_of": stamps[2]},
        {"rank_by": ["id", "asc"], "top_k": 10, "between": [stamps[1], stamps[3]]},
        {"rank_by": ["id", "asc"], "top_k": 10},
    ]}
    # The Python client sends multi-queries to /query?stainless_overload=multiQuery.
    r = httpx.post(f"{main.url}/v2/namespaces/{name}/query?stainless_overload=multiQuery", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    results = [[row["id"] for row in sub["rows"]] for sub in r.json()["results"]]
    assert results == [[1, 2], [2, 3], [1, 2, 3]]
    r = httpx.post(f"{main.url}/v2/namespaces/{name}/query", headers=AUTH,
                   json={"queries": [{"top_k": 1, "between": [5, 4]}]})
    assert r.status_code == 422
    assert r.json() == {"error": "validation_error",
                        "message": "queries[0].between lower bound 5 is greater than its upper bound 4"}


@pytest.mark.parametrize("compression", [False, True])
def test_turbopuffer_client_queries_behave_as_without_the_gateway(stack, monkeypatch, compression):
    monkeypatch.delenv("TURBOPUFFER_REGION", raising=False)
    import turbopuffer

    through = turbopuffer.Turbopuffer(api_key="e2e-key", base_url=stack["main"].url, compression=compression)
    direct = turbopuffer.Turbopuffer(api_key="e2e-key", base_url=stack["minifugu"], compression=False)
    name = ns("e2e-tpq")
    through.namespace(name).write(
        upsert_rows=[{"id": i, "vector": [0.1 * (i % 5), 0.3, 0.2], "title": f"item {i} " + "word " * 60, "n": i}
                     for i in range(1, 30)],
        distance_metric="cosine_distance",
        schema={"title": {"type": "string", "full_text_search": True}},
    )
    queries = [
        dict(rank_by=("vector", "ANN", [0.2, 0.3, 0.2]), top_k=5, include_attributes=["n"]),
        dict(rank_by=("id", "asc"), top_k=50, include_attributes=True, filters=("n", "Gte", 10)),
        dict(rank_by=("title", "BM25", "item 7"), top_k=3),
        dict(rank_by=("n", "desc"), top_k=4, filters=("And", [("n", "Lt", 20), ("n", "Gt", 3)]),
             consistency={"level": "eventual"}),
        dict(aggregate_by={"count": ("Count",)}, filters=("n", "In", [1, 2, 3])),
    ]
    for q in queries:
        a = through.namespace(name).query(**q)
        b = direct.namespace(name).query(**q)
        assert a.rows == b.rows, q
        assert a.aggregations == b.aggregations, q
    multi = dict(queries=[dict(rank_by=("id", "asc"), top_k=3), dict(rank_by=("n", "desc"), top_k=2)])
    a = through.namespace(name).multi_query(**multi)
    b = direct.namespace(name).multi_query(**multi)
    assert [r.rows for r in a.results] == [r.rows for r in b.results]


def test_queries_the_rules_leave_alone_reach_the_upstream_byte_for_byte(stack):
    recorder, recorded = stack["recorder"], stack["recorded"]
    name = ns()
    raw = b'{ "rank_by" : ["id","asc"],\n "top_k":3, "filters": ["x", "Eq", 1.50], "vector_encoding":"float"}'
    mark = len(recorder.requests)
    r = httpx.post(f"{recorded.url}/v2/namespaces/{name}/query", headers={**AUTH, "content-type": "application/json"},
                   content=raw)
    assert r.status_code == 200, r.text
    sent = recorder.since(mark)
    assert len(sent) == 1 and sent[0].body == raw
    # With as_of, only the predicate is inserted and the field removed.
    mark = len(recorder.requests)
    raw = b'{ "rank_by" : ["id","asc"],\n "as_of": 1700000000000, "filters": ["x", "Eq", 1.50]}'
    r = httpx.post(f"{recorded.url}/v2/namespaces/{name}/query", headers=AUTH, content=raw)
    assert r.status_code == 200, r.text
    assert recorder.since(mark)[0].body == (
        b'{ "rank_by" : ["id","asc"], "filters": ["And",[["x", "Eq", 1.50],'
        b'["_hevlayer_upserted_at","Lte",1700000000000]]]}')


@pytest.mark.parametrize("body,message", [
    (b'{"top_k":1,"as_of":1.5}', "as_of must be a non-negative integer of epoch milliseconds"),
    (b'{"top_k":1,"as_of":"yesterday"}', "as_of must be a non-negative integer"),
    (b'{"top_k":1,"between":[1]}', "between must be an array of two non-negative integers"),
    (b'{"as_of":1,"between":[0,1]}', "as_of and between cannot be combined"),
    (b'{"top_k":1,', "request body is not valid JSON: unexpected end of input at byte 11"),
    (b'[]', "request body must be a JSON object, found an array at byte 0"),
])
def test_bad_reads_are_422_and_nothing_reaches_the_upstream(stack, body, message):
    recorder, recorded = stack["recorder"], stack["recorded"]
    before = sum(recorded.counters().get(f"hevlayer.reads_rejected.{r}", 0) for r in ("invalid_json", "bad_field"))
    mark = len(recorder.requests)
    r = httpx.post(f"{recorded.url}/v2/namespaces/{ns()}/query", headers=AUTH, content=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "validation_error"
    assert r.json()["message"].startswith(message), r.json()
    assert recorder.since(mark) == [], "the upstream must receive nothing"
    after = sum(recorded.counters().get(f"hevlayer.reads_rejected.{r}", 0) for r in ("invalid_json", "bad_field"))
    assert after == before + 1


def test_an_updating_namespace_bounds_eventual_queries_and_leaves_strong_ones_alone(stack):
    recorder, recorded = stack["recorder"], stack["recorded"]
    name = ns("e2e-wm")
    url = f"{recorded.url}/v2/namespaces/{name}/query"
    # A write makes the namespace "recently written": the sidecar polls it every second.
    assert httpx.post(f"{recorded.url}/v2/namespaces/{name}", headers=AUTH,
                      json={"deletes": [1]}).status_code == 200

    def known():
        r = httpx.post(url, headers=AUTH, json={"top_k": 1})
        return r.headers.get("x-layer-stable-as-of")

    first = int(bounded(known, "x-layer-stable-as-of"))
    assert first <= int(time.time() * 1000) - 500
    polls = [p for p in recorder.metadata_polls if f"/namespaces/{name}/" in p.path]
    assert polls and polls[0].path == f"/v1/namespaces/{name}/metadata"
    assert polls[0].headers["authorization"] == AUTH["authorization"], "passthrough: polled with the caller's key"

    recorder.index_status[name] = "updating"
    eventual = {"rank_by": ["id", "asc"], "top_k": 2, "consistency": {"level": "eventual"}}

    def bounded_query():
        mark = len(recorder.requests)
        r = httpx.post(url, headers=AUTH, json=eventual)
        sent = json.loads(recorder.since(mark)[0].body)
        return (sent, r) if "filters" in sent else None

    sent, r = bounded(bounded_query, "the watermark predicate on an eventual query")
    watermark = int(r.headers["x-layer-stable-as-of"])
    assert sent["filters"] == ["_hevlayer_upserted_at", "Lte", watermark]
    assert watermark >= first
    assert sent["consistency"] == {"level": "eventual"} and sent["top_k"] == 2
    # A strong query goes on exactly as sent, and reports the watermark too.
    strong = b'{"rank_by":["id","asc"],"top_k":2}'
    mark = len(recorder.requests)
    r = httpx.post(url, headers=AUTH, content=strong)
    assert recorder.since(mark)[0].body == strong
    assert int(r.headers["x-layer-stable-as-of"]) == watermark, "the watermark holds while updating"
    # An eventual query with its own filter and a window: all three AND-ed.
    mark = len(recorder.requests)
    httpx.post(url, headers=AUTH, json={**eventual, "filters": ["a", "Eq", 1], "as_of": 5})
    assert json.loads(recorder.since(mark)[0].body)["filters"] == [
        "And", [["a", "Eq", 1], ["_hevlayer_upserted_at", "Lte", 5], ["_hevlayer_upserted_at", "Lte", watermark]]]
    assert recorded.counter("hevlayer.queries_rewritten.watermark") >= 2

    # Up to date again: the watermark moves on and eventual queries go on unbounded.
    recorder.index_status[name] = "up-to-date"

    def moved():
        mark = len(recorder.requests)
        r = httpx.post(url, headers=AUTH, json=eventual)
        sent = json.loads(recorder.since(mark)[0].body)
        return "filters" not in sent and int(r.headers["x-layer-stable-as-of"]) > watermark

    bounded(moved, "the watermark moving on")
    # The sidecar shows the watermark's age for this namespace.
    metrics = httpx.get(f"http://127.0.0.1:{stack['recorder_sidecar_port']}/metrics").text
    assert f'hevlayer_sidecar_watermark_age_seconds{{namespace="{name}"}}' in metrics


def test_keys_mode_registrations_carry_no_key(keys_stack):
    ks = keys_stack
    name = ns()
    r = httpx.post(f"{ks.gateway.url}/v2/namespaces/{name}/query",
                   headers={"authorization": f"Bearer {ks.keys['read']}"}, json={"top_k": 1, "as_of": 3})
    assert r.status_code == 200, r.text
    sent = json.loads(ks.recorder.requests[-1].body)
    assert sent["filters"] == ["_hevlayer_upserted_at", "Lte", 3]

    def registered():
        return [q for q in ks.tap.registrations if name.encode() in q.body]

    regs = bounded(registered, "a watermark registration")
    for q in regs:
        assert q.headers.get("authorization") is None
        assert all("authorization" not in n for n in json.loads(q.body)["namespaces"])
        for key in ks.keys.values():
            assert key.encode() not in q.body
    # The sidecar polls with its own key, which the filter swaps for the upstream key.
    def polled():
        return [p for p in ks.recorder.metadata_polls if f"/namespaces/{name}/" in p.path]

    polls = bounded(polled, "a metadata poll")
    assert polls[0].headers["authorization"] == f"Bearer {ks.upstream_key}"
