"""The demo's two-stage pipeline, run with the official `hevlayer` client through the gateway.

- The CPU worker stages each product as a pipeline document: a title chunk (carrying the product's
  attributes as metadata) and a description chunk (`put_pipeline_document_chunks`).
- The embedding worker claims batches (`claim_documents`), reads their chunks
  (`get_pipeline_document_chunks`), embeds them (demo/embedder.py), writes one vector per product
  with its attributes (`put_pipeline_document_vectors`: the gateway's sidecar writes them into the
  product namespace through the stamped write path, and marks the document indexed) and closes the
  batch (`complete_documents` for what is still claimed, `fail_documents` for what had nothing to
  embed)."""

import asyncio
from dataclasses import dataclass, field

from hevlayer import AsyncHevlayer, HevlayerError

import embedder

STAGES = ("pending", "embedding", "indexed", "failed")
# Declared once the namespace exists (the first vectors create it): BM25 needs a full-text index.
FULL_TEXT_SCHEMA = {
    "title": {"type": "string", "full_text_search": True},
    "description": {"type": "string", "full_text_search": True},
}


@dataclass
class Progress:
    """What the workers of the current run have done, for the page."""

    run: int = 0
    running: bool = False
    staged: int = 0
    embedded: int = 0
    failed: int = 0
    batches: int = 0
    error: str | None = None
    full_text_ready: bool = False
    tasks: list = field(default_factory=list)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "tasks"}


@dataclass
class Settings:
    pipeline_id: str
    namespace: str
    batch_size: int = 16
    stage_concurrency: int = 8
    # Seconds between stagings and between batches, so the counts can be watched moving.
    stage_pause: float = 0.05
    embed_pause: float = 0.3
    worker_id: str = "embedding-worker-1"


def chunks_of(product):
    """A product as pipeline chunks: the title (with its attributes as metadata) and the description."""
    pid = product["id"]
    return {"chunks": [
        {"id": f"{pid}-title", "text": f"{product['title']} ({product['category']})",
         "metadata": {"title": product["title"], "category": product["category"],
                      "price_cents": round(product["price"] * 100)}},
        {"id": f"{pid}-description", "text": product["description"]},
    ]}


def vector_entry(doc_id, chunks):
    """One vector for the product: the mean of its chunks' embeddings, with its attributes."""
    texts = [c.text for c in chunks if c.text]
    if not texts:
        return None
    meta = next((c.metadata for c in chunks if c.metadata), {}) or {}
    description = next((c.text for c in chunks if c.id.endswith("-description")), "")
    attributes = {"title": meta.get("title", ""), "category": meta.get("category", ""),
                  "price_cents": meta.get("price_cents", 0), "description": description}
    return {"id": doc_id, "vector": embedder.mean([embedder.embed(t) for t in texts]), "attributes": attributes}


async def cpu_worker(client: AsyncHevlayer, settings: Settings, products, progress: Progress):
    limit = asyncio.Semaphore(settings.stage_concurrency)

    async def stage(product):
        async with limit:
            await client.put_pipeline_document_chunks(settings.pipeline_id, product["id"], chunks_of(product))
            progress.staged += 1
            await asyncio.sleep(settings.stage_pause)

    await asyncio.gather(*(stage(p) for p in products))


async def embedding_worker(client: AsyncHevlayer, settings: Settings, total, progress: Progress):
    """Claims batches until every product of this run is indexed or failed."""
    while progress.embedded + progress.failed < total:
        claimed = await client.claim_documents(
            settings.pipeline_id,
            {"worker_id": settings.worker_id, "limit": settings.batch_size, "lease_seconds": 60})
        if not claimed.documents:
            await asyncio.sleep(0.1)
            continue
        progress.batches += 1
        empty = []
        for doc_id in claimed.documents:
            chunks = await client.get_pipeline_document_chunks(settings.pipeline_id, doc_id)
            entry = vector_entry(doc_id, chunks)
            if entry is None:
                empty.append(doc_id)
                continue
            await client.put_pipeline_document_vectors(settings.pipeline_id, doc_id, {"vectors": [entry]})
            progress.embedded += 1
        if empty:
            await client.fail_documents(settings.pipeline_id, empty, from_stage="embedding", worker_id=settings.worker_id)
            progress.failed += len(empty)
        # Writing the vectors indexed each document; any still claimed (re-staged meanwhile) closes here.
        await client.complete_documents(settings.pipeline_id, list(claimed.documents), from_stage="embedding",
                                        worker_id=settings.worker_id)
        if not progress.full_text_ready:
            await client.update_turbopuffer_namespace_schema(settings.namespace, FULL_TEXT_SCHEMA)
            progress.full_text_ready = True
        await asyncio.sleep(settings.embed_pause)


async def run_pipeline(client: AsyncHevlayer, settings: Settings, products, progress: Progress):
    """One run of both workers over the whole catalogue (re-staging resets documents to pending)."""
    progress.run += 1
    progress.running, progress.error = True, None
    progress.staged = progress.embedded = progress.failed = progress.batches = 0
    try:
        await client.ensure_pipeline({"id": settings.pipeline_id, "target_namespace": settings.namespace})
        # A task group: if one worker fails, the other is cancelled instead of waiting forever.
        async with asyncio.TaskGroup() as group:
            group.create_task(cpu_worker(client, settings, products, progress))
            group.create_task(embedding_worker(client, settings, len(products), progress))
    except* (HevlayerError, OSError) as failed:
        first = failed.exceptions[0]
        progress.error = f"{type(first).__name__}: {first}"
    finally:
        progress.running = False


async def stage_counts(client: AsyncHevlayer, pipeline_id):
    """The pipeline status route's counts for the four stages, and its overall status."""
    status = await client.get_pipeline_status(pipeline_id)
    return {stage: status.counts.get(stage, 0) for stage in STAGES}, status.status
