//! The watermark poller: the I/O of [`Watermarks`](crate::watermark::Watermarks). It takes the
//! due namespaces from the state machine, reads their metadata through the gateway and records
//! each outcome there and in the metrics. The state machine does not know this module.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use tokio::sync::Semaphore;

use crate::state::SharedState;
use crate::watermark::{failed, outcome_of, PollJob, PollOutcome};

/// Polls due namespaces until the process stops: wakes every `min(poll_ms, 100 ms)`, runs at most
/// `concurrency` metadata requests at once.
pub async fn run_poller(state: SharedState) {
    let settings = state.watermarks.settings().clone();
    let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let tick = Duration::from_millis(settings.poll_ms.clamp(1, 100));
    loop {
        tokio::time::sleep(tick).await;
        let free = permits.available_permits();
        if free == 0 {
            continue;
        }
        for job in state.watermarks.due(crate::cache::now_ms(), free) {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            let state = state.clone();
            tokio::spawn(async move {
                poll(&state, job).await;
                drop(permit);
            });
        }
    }
}

/// One metadata poll, recorded in the state machine and the metrics.
async fn poll(state: &SharedState, job: PollJob) {
    let started = crate::cache::now_ms();
    let timeout = Duration::from_millis(state.watermarks.settings().poll_timeout_ms);
    let caller = job
        .authorization
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok());
    let outcome = match state.gateway.authorization(caller.as_ref()) {
        Err(_) => failed("no_credential", None),
        Ok(authorization) => match state
            .gateway
            .get_metadata(&job.namespace, authorization, timeout)
            .await
        {
            Ok(response) => outcome_of(response.status, &response.headers, &response.body),
            Err(e) if e.status == StatusCode::GATEWAY_TIMEOUT => failed("timeout", None),
            Err(_) => failed("unreachable", None),
        },
    };
    if let PollOutcome::Failed { reason, .. } = outcome {
        tracing::debug!(namespace = %job.namespace, reason, "watermark poll failed");
    }
    state.metrics.record_watermark_poll(outcome.label());
    state
        .watermarks
        .finish(&job.namespace, started, outcome, crate::cache::now_ms());
}
