"""The official Python clients, unchanged, pointed at the gateway."""

import asyncio
import os
import uuid

import httpx
import pytest

from conftest import wait_until  # noqa: F401  (keeps the fixture module imported first)


def test_turbopuffer_client_writes_and_queries(stack, monkeypatch):
    monkeypatch.delenv("TURBOPUFFER_REGION", raising=False)
    import turbopuffer

    client = turbopuffer.Turbopuffer(api_key="e2e-key", base_url=stack["main"].url)
    ns = client.namespace(f"e2e-client-{uuid.uuid4().hex[:8]}")
    result = ns.write(
        upsert_rows=[{"id": 1, "vector": [0.1, 0.2, 0.3], "title": "a"}, {"id": 2, "vector": [0.3, 0.2, 0.1], "title": "b"}],
        distance_metric="cosine_distance",
    )
    assert result.rows_affected == 2
    rows = ns.query(rank_by=("vector", "ANN", [0.1, 0.2, 0.3]), top_k=2, include_attributes=True).rows
    assert rows[0].id == 1
    assert isinstance(rows[0]["_hevlayer_upserted_at"], int)
    ns.write(patch_rows=[{"id": 2, "title": "b2"}])
    with pytest.raises(turbopuffer.UnprocessableEntityError):
        ns.write(upsert_rows=[{"id": 3, "_hevlayer_x": 1, "vector": [0.1, 0.1, 0.1]}], distance_metric="cosine_distance")


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


def test_hevlayer_client_whole_pipeline_flow(stack):
    from hevlayer import AsyncHevlayer

    async def run():
        client = AsyncHevlayer(api_key="e2e-key", base_url=stack["main"].url)
        pid, target = f"pf-{uuid.uuid4().hex[:8]}", f"e2e-hf-{uuid.uuid4().hex[:8]}"
        await client.ensure_pipeline({"id": pid, "target_namespace": target})
        await client.ensure_pipeline({"id": pid, "target_namespace": target})
        for doc in ("d1", "d2"):
            await client.put_pipeline_document_chunks(pid, doc, {"chunks": [{"id": f"{doc}-c1", "text": "hi"}]})
        claimed = await client.claim_documents(pid, {"worker_id": "w"})
        assert sorted(claimed.documents) == ["d1", "d2"]
        chunks = await client.get_pipeline_document_chunks(pid, "d1")
        assert chunks is not None
        await client.heartbeat_documents(pid, {"worker_id": "w", "document_ids": ["d1", "d2"]})
        await client.write_single_vector(pid, "d1", {"id": "d1-c1", "vector": [0.5, 0.5]})
        await client.complete_documents(pid, ["d1"], worker_id="w")
        await client.fail_documents(pid, ["d2"], worker_id="w")
        await client.write_namespace(target, {"upsert_rows": [{"id": "p1", "vector": [0.1, 0.9], "n": 1}], "distance_metric": "cosine_distance"})
        await client.patch_columns(target, ["p1"], {"n": [2]})
        doc = await client.fetch_document(target, "p1")
        assert doc.id == "p1"
        rows = httpx.post(f"{stack['main'].url}/v2/namespaces/{target}/query", headers={"Authorization": "Bearer e2e-key"},
                          json={"rank_by": ["id", "asc"], "top_k": 10, "include_attributes": True}).json()["rows"]
        by_id = {r["id"]: r for r in rows}
        assert by_id["p1"]["n"] == 2
        assert isinstance(by_id["d1-c1"]["_hevlayer_upserted_at"], int)
        await client.delete_pipeline(pid)

    asyncio.run(run())
