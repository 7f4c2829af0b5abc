"""The official Python clients, unchanged, pointed at the gateway."""

import asyncio
import os
import uuid

import httpx
import pytest

from conftest import wait_until


# The turbopuffer client gzips request bodies over 1024 bytes when compression is on: this pads a
# row well past that, so each write below is compressed, or clearly not.
PAD = "p" * 1500


@pytest.mark.parametrize("compression", [False, True])
def test_turbopuffer_client_writes_and_queries(stack, monkeypatch, compression):
    monkeypatch.delenv("TURBOPUFFER_REGION", raising=False)
    import turbopuffer

    main = stack["main"]
    gzipped = main.counter("hevlayer.gzip_decoded")
    mirrored = main.counter("hevlayer.mirror_ok")
    client = turbopuffer.Turbopuffer(api_key="e2e-key", base_url=main.url, compression=compression)
    ns = client.namespace(f"e2e-client-{uuid.uuid4().hex[:8]}")
    result = ns.write(
        upsert_rows=[{"id": 1, "vector": [0.1, 0.2, 0.3], "title": "a", "pad": PAD},
                     {"id": 2, "vector": [0.3, 0.2, 0.1], "title": "b", "pad": PAD}],
        distance_metric="cosine_distance",
    )
    assert result.rows_affected == 2
    # The upsert's mirror goes after its response; the patch below merges into what it cached.
    # (A patch that overtakes it leaves the document uncached instead: never the older copy.)
    wait_until(lambda: main.counter("hevlayer.mirror_ok") > mirrored, "the upsert's mirror", seconds=10)
    rows = ns.query(rank_by=("vector", "ANN", [0.1, 0.2, 0.3]), top_k=2, include_attributes=True).rows
    assert rows[0].id == 1
    first_stamp = rows[1]["_hevlayer_upserted_at"]
    assert isinstance(rows[0]["_hevlayer_upserted_at"], int) and rows[0]["_hevlayer_upserted_at"] == first_stamp
    patched = ns.write(patch_rows=[{"id": 2, "title": "b2", "pad": PAD + "2"}])
    assert patched.rows_affected == 1
    rows = {r.id: r for r in ns.query(rank_by=("id", "asc"), top_k=10, include_attributes=True).rows}
    assert (rows[1]["title"], rows[2]["title"], rows[2]["pad"]) == ("a", "b2", PAD + "2")
    assert rows[2]["_hevlayer_upserted_at"] >= first_stamp == rows[1]["_hevlayer_upserted_at"], "the patch was stamped anew"
    # The patch went through the write path: mirrored into the cache and merged.
    cached = httpx.get(f"{main.url}/v2/namespaces/{ns.id}/documents/2", headers={"authorization": "Bearer e2e-key"})
    assert cached.headers["x-layer-cache"] == "hit"
    assert cached.json()["attributes"]["title"] == "b2"
    with pytest.raises(turbopuffer.UnprocessableEntityError):
        ns.write(upsert_rows=[{"id": 3, "_hevlayer_x": 1, "vector": [0.1, 0.1, 0.1]}], distance_metric="cosine_distance")
    # The upsert and the patch (both over 1024 bytes) came gzipped; the small rejected write did not.
    assert main.counter("hevlayer.gzip_decoded") - gzipped == (2 if compression else 0)


def test_hevlayer_client_pipeline_calls(stack):
    from hevlayer import AsyncHevlayer

    async def run():
        client = AsyncHevlayer(api_key="e2e-key", base_url=stack["main"].url)
        pid, target = f"pc-{uuid.uuid4().hex[:8]}", f"e2e-hl-{uuid.uuid4().hex[:8]}"
        await client.create_pipeline({"id": pid, "target_namespace": target})
        staged = await client.put_pipeline_document_chunks(pid, "d1", {"chunks": [{"id": "c1", "text": "hi"}]})
        assert staged.stage == "pending"
        status = await client.get_pipeline_status(pid)
        assert status.status == "pending"
        claimed = await client.claim_documents(pid, {"worker_id": "w"})
        assert claimed.documents == ["d1"]
        await client.put_pipeline_document_vectors(pid, "d1", {"vectors": [{"id": "c1", "vector": [0.5, 0.5]}]})
        assert (await client.get_pipeline_status(pid)).status == "idle"
        written = await client.write_namespace(target, {"upsert_rows": [{"id": "extra", "vector": [0.1, 0.9]}], "distance_metric": "cosine_distance"})
        assert written.rows_affected == 1
        doc = await client.fetch_document(target, "extra")
        assert doc.id == "extra"
        await client.delete_pipeline(pid)

    asyncio.run(run())


@pytest.mark.parametrize("compression", [False, True])
def test_turbopuffer_client_columns_conditions_deletes(stack, monkeypatch, compression):
    monkeypatch.delenv("TURBOPUFFER_REGION", raising=False)
    import turbopuffer

    gzipped = stack["main"].counter("hevlayer.gzip_decoded")
    client = turbopuffer.Turbopuffer(api_key="e2e-key", base_url=stack["main"].url, compression=compression)
    ns = client.namespace(f"e2e-cols-{uuid.uuid4().hex[:8]}")
    ids = list(range(1, 41))
    result = ns.write(
        upsert_columns={"id": ids, "vector": [[0.1 * (i % 7), 0.2, 0.3] for i in ids], "title": ["x" * 40 for _ in ids]},
        distance_metric="cosine_distance",
    )
    assert result.rows_affected == 40
    ns.write(upsert_rows=[{"id": 1, "vector": [0.9, 0.1, 0.1], "title": "new"}], upsert_condition=("title", "Eq", "nope"),
             distance_metric="cosine_distance")
    ns.write(deletes=[2, 3])
    rows = {r.id: r for r in ns.query(rank_by=("id", "asc"), top_k=100, include_attributes=True).rows}
    assert 2 not in rows and 3 not in rows and len(rows) == 38
    assert rows[1]["title"] == "x" * 40
    assert all(isinstance(r["_hevlayer_upserted_at"], int) for r in rows.values())
    # Only the 40-row column write is over the client's 1024-byte threshold.
    assert stack["main"].counter("hevlayer.gzip_decoded") - gzipped == (1 if compression else 0)


def test_hevlayer_client_whole_pipeline_flow(stack):
    from hevlayer import AsyncHevlayer

    async def run():
        client = AsyncHevlayer(api_key="e2e-key", base_url=stack["main"].url)
        pid, target = f"pf-{uuid.uuid4().hex[:8]}", f"e2e-hf-{uuid.uuid4().hex[:8]}"
        created = await client.ensure_pipeline({"id": pid, "target_namespace": target})
        again = await client.ensure_pipeline({"id": pid, "target_namespace": target})
        assert (created.id, created.target_namespace, created.distance_metric) == (pid, target, "cosine_distance")
        assert again.created_at == created.created_at, "the second call found the existing pipeline"
        docs = ("d1", "d2", "d3")
        for doc in docs:
            staged = await client.put_pipeline_document_chunks(
                pid, doc, {"chunks": [{"id": f"{doc}-c1", "text": f"{doc} one"}, {"id": f"{doc}-c2", "text": f"{doc} two", "metadata": {"n": 2}}]})
            assert (staged.stage, staged.chunk_count, staged.chunk_ids) == ("pending", 2, [f"{doc}-c1", f"{doc}-c2"])
        claimed = await client.claim_documents(pid, {"worker_id": "w"})
        assert sorted(claimed.documents) == list(docs)
        chunks = await client.get_pipeline_document_chunks(pid, "d1")
        assert [(c.id, c.text, c.metadata) for c in chunks] == [("d1-c1", "d1 one", None), ("d1-c2", "d1 two", {"n": 2})]
        beat = await client.heartbeat_documents(pid, {"worker_id": "w", "document_ids": list(docs)})
        assert (beat.stage, beat.updated) == ("embedding", 3)
        assert (await client.heartbeat_documents(pid, {"worker_id": "other", "document_ids": list(docs)})).updated == 0
        await client.write_single_vector(pid, "d1", {"id": "d1-c1", "vector": [0.5, 0.5]})
        status = await client.get_pipeline_status(pid)
        assert status.status == "waiting_on_upstream"
        assert (status.counts.get("indexed"), status.counts.get("embedding"), status.processing_count) == (1, 2, 2)
        # Only the worker holding the lease moves a document.
        assert (await client.complete_documents(pid, ["d2"], worker_id="other")).updated == 0
        done = await client.complete_documents(pid, ["d2"], worker_id="w")
        assert (done.stage, done.updated) == ("indexed", 1)
        failed = await client.fail_documents(pid, ["d3"], worker_id="w")
        assert (failed.stage, failed.updated) == ("failed", 1)
        status = await client.get_pipeline_status(pid)
        assert status.status == "idle"
        assert status.counts.get("indexed") == 2 and status.counts.get("failed") == 1
        assert status.counts.get("embedding", 0) == 0 and status.counts.get("pending", 0) == 0
        assert (status.pending_count, status.processing_count, status.failed_count) == (0, 0, 1)
        written = await client.write_namespace(target, {"upsert_rows": [{"id": "p1", "vector": [0.1, 0.9], "n": 1}], "distance_metric": "cosine_distance"})
        assert written.rows_affected == 1
        patched = await client.patch_columns(target, ["p1"], {"n": [2]})
        assert patched.rows_affected == 1
        doc = await client.fetch_document(target, "p1")
        assert doc.id == "p1" and doc.attributes["n"] == 2, "the cache merged the patch"
        rows = httpx.post(f"{stack['main'].url}/v2/namespaces/{target}/query", headers={"Authorization": "Bearer e2e-key"},
                          json={"rank_by": ["id", "asc"], "top_k": 10, "include_attributes": True}).json()["rows"]
        by_id = {r["id"]: r for r in rows}
        assert by_id["p1"]["n"] == 2
        assert isinstance(by_id["d1-c1"]["_hevlayer_upserted_at"], int)
        await client.delete_pipeline(pid)

    asyncio.run(run())
