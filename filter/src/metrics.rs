//! The filter's counters. Every decision the filter makes counts under one of these names.

/// Why a write body was refused with 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteReason {
    /// Not JSON, or JSON but not an object.
    InvalidJson,
    NoOperation,
    RemovedKey,
    ReservedAttribute,
    Shape,
    /// A `content-encoding` other than gzip or identity, or gzip that does not decode.
    BadEncoding,
}

impl WriteReason {
    pub const ALL: [WriteReason; 6] = [
        WriteReason::InvalidJson,
        WriteReason::NoOperation,
        WriteReason::RemovedKey,
        WriteReason::ReservedAttribute,
        WriteReason::Shape,
        WriteReason::BadEncoding,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WriteReason::InvalidJson => "invalid_json",
            WriteReason::NoOperation => "no_operation",
            WriteReason::RemovedKey => "removed_key",
            WriteReason::ReservedAttribute => "reserved_attribute",
            WriteReason::Shape => "shape",
            WriteReason::BadEncoding => "bad_encoding",
        }
    }
}

/// Why a query was refused with 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadReason {
    /// Not JSON, or JSON but not an object.
    InvalidJson,
    /// `as_of` or `between` is invalid, both are given, or a member the rewrite reads is repeated.
    BadField,
    /// A `content-encoding` other than gzip or identity, or gzip that does not decode.
    BadEncoding,
}

impl ReadReason {
    pub const ALL: [ReadReason; 3] = [
        ReadReason::InvalidJson,
        ReadReason::BadField,
        ReadReason::BadEncoding,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReadReason::InvalidJson => "invalid_json",
            ReadReason::BadField => "bad_field",
            ReadReason::BadEncoding => "bad_encoding",
        }
    }
}

/// A counter and how much to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    WritesAccepted,
    WritesRejected(WriteReason),
    RowsStamped(u64),
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    UpstreamError,
    GatewayTimeout,
    /// Envoy found no route for the request (its 404, answered as JSON).
    RouteNotFound,
    /// Envoy refused to replace a request body: answered 500, nothing forwarded.
    BodyReplaceFailed,
    /// Envoy refused to hand over a buffered body: a request body is answered 500 and nothing
    /// is forwarded; a write's response body leaves its mirror undone (fenced).
    BodyReadFailed,
    GzipDecoded,
    AffectedIdsRequested,
    AffectedIdsStripped,
    MirrorOk,
    MirrorFailed,
    MirrorTimeout,
    /// An accepted write with nothing to mirror: Turbopuffer refused it, or it changes no
    /// document (schema, copy, branch).
    MirrorSkipped,
    /// An accepted write whose outcome the filter never saw (the client hung up, Envoy timed out
    /// or reset): fenced.
    WritesUnanswered,
    /// A write's eviction of the documents it names, sent while Turbopuffer applies it (its
    /// mirror then goes after the response): answered, or failed (the documents are fenced).
    EvictAheadOk,
    EvictAheadFailed,
    /// A write's eviction ahead that went in its worker's group (group commit), and the group
    /// callouts the root contexts sent.
    EvictAheadGrouped,
    EvictionGroups,
    /// A mirror that rode an eviction ahead instead of waiting for a batch of its own.
    MirrorRode,
    /// A mirror that would go after its response found the worker's mirror queue full: dropped
    /// (and counted as `MirrorFailed` too); its documents were evicted already.
    MirrorQueueFull,
    /// A document fetch of a fenced namespace, sent past the cache.
    FetchesBypassed,
    /// The root context's eviction requests: failed (retried later) and namespaces acknowledged.
    EvictionsRetried,
    EvictionsAcknowledged,
    /// A namespace's fence grew past its id limit: its cache is purged instead.
    EvictionsAsPurge,
    /// A fence dropped because the worker already fences the most namespaces it keeps.
    FenceOverflow,
    PurgeOk,
    PurgeFailed,
    SidecarRouted,
    SidecarUnavailable,
    CalloutDispatchFailed,
    /// A query (or multi-query) got a predicate from `as_of` or `between`.
    QueriesTemporal,
    /// A query got the read watermark's predicate.
    QueriesWatermarked,
    /// A query of a namespace whose watermark is unknown or stale (no header, no watermark).
    QueriesWithoutWatermark,
    ReadsRejected(ReadReason),
    /// The root context's refresh of watermarks from the sidecar.
    WatermarkRefreshOk,
    WatermarkRefreshFailed,
}

impl Counter {
    /// The metric name (Envoy shows it among the wasm stats).
    pub fn name(self) -> &'static str {
        match self {
            Counter::WritesAccepted => "hevlayer.writes_accepted",
            Counter::WritesRejected(reason) => match reason {
                WriteReason::InvalidJson => "hevlayer.writes_rejected.invalid_json",
                WriteReason::NoOperation => "hevlayer.writes_rejected.no_operation",
                WriteReason::RemovedKey => "hevlayer.writes_rejected.removed_key",
                WriteReason::ReservedAttribute => "hevlayer.writes_rejected.reserved_attribute",
                WriteReason::Shape => "hevlayer.writes_rejected.shape",
                WriteReason::BadEncoding => "hevlayer.writes_rejected.bad_encoding",
            },
            Counter::RowsStamped(_) => "hevlayer.rows_stamped",
            Counter::PayloadTooLarge => "hevlayer.payload_too_large",
            Counter::Unauthorized => "hevlayer.auth_unauthorized",
            Counter::Forbidden => "hevlayer.auth_forbidden",
            Counter::UpstreamError => "hevlayer.upstream_error",
            Counter::GatewayTimeout => "hevlayer.gateway_timeout",
            Counter::RouteNotFound => "hevlayer.route_not_found",
            Counter::BodyReplaceFailed => "hevlayer.body_replace_failed",
            Counter::BodyReadFailed => "hevlayer.body_read_failed",
            Counter::GzipDecoded => "hevlayer.gzip_decoded",
            Counter::AffectedIdsRequested => "hevlayer.affected_ids_requested",
            Counter::AffectedIdsStripped => "hevlayer.affected_ids_stripped",
            Counter::MirrorOk => "hevlayer.mirror_ok",
            Counter::MirrorFailed => "hevlayer.mirror_failed",
            Counter::MirrorTimeout => "hevlayer.mirror_timeout",
            Counter::MirrorSkipped => "hevlayer.mirror_skipped",
            Counter::WritesUnanswered => "hevlayer.writes_unanswered",
            Counter::EvictAheadOk => "hevlayer.evict_ahead_ok",
            Counter::EvictAheadFailed => "hevlayer.evict_ahead_failed",
            Counter::EvictAheadGrouped => "hevlayer.evict_ahead_grouped",
            Counter::EvictionGroups => "hevlayer.eviction_groups",
            Counter::MirrorRode => "hevlayer.mirror_rode",
            Counter::MirrorQueueFull => "hevlayer.mirror_queue_full",
            Counter::FetchesBypassed => "hevlayer.fetches_bypassed",
            Counter::EvictionsRetried => "hevlayer.evictions_retried",
            Counter::EvictionsAcknowledged => "hevlayer.evictions_acknowledged",
            Counter::EvictionsAsPurge => "hevlayer.evictions_as_purge",
            Counter::FenceOverflow => "hevlayer.fence_overflow",
            Counter::PurgeOk => "hevlayer.purge_ok",
            Counter::PurgeFailed => "hevlayer.purge_failed",
            Counter::SidecarRouted => "hevlayer.sidecar_routed",
            Counter::SidecarUnavailable => "hevlayer.sidecar_unavailable",
            Counter::CalloutDispatchFailed => "hevlayer.callout_dispatch_failed",
            Counter::QueriesTemporal => "hevlayer.queries_rewritten.temporal",
            Counter::QueriesWatermarked => "hevlayer.queries_rewritten.watermark",
            Counter::QueriesWithoutWatermark => "hevlayer.queries_without_watermark",
            Counter::ReadsRejected(reason) => match reason {
                ReadReason::InvalidJson => "hevlayer.reads_rejected.invalid_json",
                ReadReason::BadField => "hevlayer.reads_rejected.bad_field",
                ReadReason::BadEncoding => "hevlayer.reads_rejected.bad_encoding",
            },
            Counter::WatermarkRefreshOk => "hevlayer.watermark_refresh_ok",
            Counter::WatermarkRefreshFailed => "hevlayer.watermark_refresh_failed",
        }
    }

    pub fn amount(self) -> u64 {
        match self {
            Counter::RowsStamped(n) => n,
            _ => 1,
        }
    }

    /// Every counter name a request can increment, so the glue can define them all at start.
    pub fn all_names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = WriteReason::ALL
            .iter()
            .map(|&r| Counter::WritesRejected(r).name())
            .collect();
        names.extend(ReadReason::ALL.iter().map(|&r| Counter::ReadsRejected(r).name()));
        names.extend(
            [
                Counter::WritesAccepted,
                Counter::RowsStamped(0),
                Counter::PayloadTooLarge,
                Counter::Unauthorized,
                Counter::Forbidden,
                Counter::UpstreamError,
                Counter::GatewayTimeout,
                Counter::RouteNotFound,
                Counter::BodyReplaceFailed,
                Counter::BodyReadFailed,
                Counter::GzipDecoded,
                Counter::AffectedIdsRequested,
                Counter::AffectedIdsStripped,
                Counter::MirrorOk,
                Counter::MirrorFailed,
                Counter::MirrorTimeout,
                Counter::MirrorSkipped,
                Counter::WritesUnanswered,
                Counter::EvictAheadOk,
                Counter::EvictAheadFailed,
                Counter::EvictAheadGrouped,
                Counter::EvictionGroups,
                Counter::MirrorRode,
                Counter::MirrorQueueFull,
                Counter::FetchesBypassed,
                Counter::EvictionsRetried,
                Counter::EvictionsAcknowledged,
                Counter::EvictionsAsPurge,
                Counter::FenceOverflow,
                Counter::PurgeOk,
                Counter::PurgeFailed,
                Counter::SidecarRouted,
                Counter::SidecarUnavailable,
                Counter::CalloutDispatchFailed,
                Counter::QueriesTemporal,
                Counter::QueriesWatermarked,
                Counter::QueriesWithoutWatermark,
                Counter::WatermarkRefreshOk,
                Counter::WatermarkRefreshFailed,
            ]
            .map(Counter::name),
        );
        names
    }
}

/// The gauge of namespaces this VM asks the sidecar to watch.
pub const NAMESPACES_TRACKED: &str = "hevlayer.watermark_namespaces";
/// The gauge of fenced namespaces (evictions pending), added to by every worker.
pub const EVICTIONS_PENDING: &str = "hevlayer.evictions_pending";
/// The gauge of mirrors waiting in the workers' queues to be sent after their responses.
pub const MIRRORS_QUEUED: &str = "hevlayer.mirrors_queued";
/// The gauge of the filter VMs' linear memory, in bytes (every worker adds its own).
pub const VM_MEMORY_BYTES: &str = "hevlayer.vm_memory_bytes";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let names = Counter::all_names();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(names.iter().all(|n| n.starts_with("hevlayer.")));
        for gauge in [
            NAMESPACES_TRACKED,
            EVICTIONS_PENDING,
            MIRRORS_QUEUED,
            VM_MEMORY_BYTES,
        ] {
            assert!(!names.contains(&gauge));
        }
        for reason in WriteReason::ALL {
            assert!(Counter::WritesRejected(reason).name().ends_with(reason.as_str()));
        }
        for reason in ReadReason::ALL {
            assert!(Counter::ReadsRejected(reason).name().ends_with(reason.as_str()));
        }
    }
}
