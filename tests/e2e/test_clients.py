"""The official Python clients, unchanged, pointed at the gateway."""

import asyncio
import os
import uuid

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
