//! The contracts the backends meet, one suite per store: `documents` (`DocumentStore`) and
//! `pipelines` (`PipelineStore`). Each suite is called once per backend with a factory for fresh
//! instances; every check uses its own namespace and pipeline names, so a shared (external) store
//! works too.

pub mod documents;
pub mod pipelines;

use std::sync::Arc;

use super::{DocumentStore, PipelineStore};

/// Runs both suites on a backend that implements both stores.
pub async fn run_all<B, F>(factory: F)
where
    B: DocumentStore + PipelineStore + 'static,
    F: Fn() -> Arc<B> + Sync,
{
    documents::run_all(&|| factory() as Arc<dyn DocumentStore>).await;
    pipelines::run_all(&|| factory() as Arc<dyn PipelineStore>).await;
}
