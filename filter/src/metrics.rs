//! The filter's counters. Every decision the filter makes counts under one of these names.

/// A counter and how much to add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    WritesAccepted,
    WritesRejected(&'static str),
    RowsStamped(u64),
    PayloadTooLarge,
    Unauthorized,
    Forbidden,
    UpstreamError,
    GatewayTimeout,
    GzipDecoded,
    AffectedIdsRequested,
    AffectedIdsStripped,
    MirrorOk,
    MirrorFailed,
    MirrorTimeout,
    PurgeOk,
    PurgeFailed,
    SidecarRouted,
    SidecarUnavailable,
    CalloutDispatchFailed,
}

/// Rejection reasons, as in [`crate::write::Rejection::reason`].
pub const REJECTION_REASONS: [&str; 6] = [
    "invalid_json",
    "no_operation",
    "removed_key",
    "reserved_attribute",
    "shape",
    "bad_encoding",
];

impl Counter {
    /// The metric name (Envoy shows it among the wasm stats).
    pub fn name(self) -> &'static str {
        match self {
            Counter::WritesAccepted => "hevlayer.writes_accepted",
            Counter::WritesRejected(reason) => match reason {
                "invalid_json" => "hevlayer.writes_rejected.invalid_json",
                "no_operation" => "hevlayer.writes_rejected.no_operation",
                "removed_key" => "hevlayer.writes_rejected.removed_key",
                "reserved_attribute" => "hevlayer.writes_rejected.reserved_attribute",
                "shape" => "hevlayer.writes_rejected.shape",
                _ => "hevlayer.writes_rejected.bad_encoding",
            },
            Counter::RowsStamped(_) => "hevlayer.rows_stamped",
            Counter::PayloadTooLarge => "hevlayer.payload_too_large",
            Counter::Unauthorized => "hevlayer.auth_unauthorized",
            Counter::Forbidden => "hevlayer.auth_forbidden",
            Counter::UpstreamError => "hevlayer.upstream_error",
            Counter::GatewayTimeout => "hevlayer.gateway_timeout",
            Counter::GzipDecoded => "hevlayer.gzip_decoded",
            Counter::AffectedIdsRequested => "hevlayer.affected_ids_requested",
            Counter::AffectedIdsStripped => "hevlayer.affected_ids_stripped",
            Counter::MirrorOk => "hevlayer.mirror_ok",
            Counter::MirrorFailed => "hevlayer.mirror_failed",
            Counter::MirrorTimeout => "hevlayer.mirror_timeout",
            Counter::PurgeOk => "hevlayer.purge_ok",
            Counter::PurgeFailed => "hevlayer.purge_failed",
            Counter::SidecarRouted => "hevlayer.sidecar_routed",
            Counter::SidecarUnavailable => "hevlayer.sidecar_unavailable",
            Counter::CalloutDispatchFailed => "hevlayer.callout_dispatch_failed",
        }
    }

    pub fn amount(self) -> u64 {
        match self {
            Counter::RowsStamped(n) => n,
            _ => 1,
        }
    }

    /// Every counter name, so the glue can define them all at start.
    pub fn all_names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = REJECTION_REASONS
            .iter()
            .map(|r| Counter::WritesRejected(r).name())
            .collect();
        names.extend(
            [
                Counter::WritesAccepted,
                Counter::RowsStamped(0),
                Counter::PayloadTooLarge,
                Counter::Unauthorized,
                Counter::Forbidden,
                Counter::UpstreamError,
                Counter::GatewayTimeout,
                Counter::GzipDecoded,
                Counter::AffectedIdsRequested,
                Counter::AffectedIdsStripped,
                Counter::MirrorOk,
                Counter::MirrorFailed,
                Counter::MirrorTimeout,
                Counter::PurgeOk,
                Counter::PurgeFailed,
                Counter::SidecarRouted,
                Counter::SidecarUnavailable,
                Counter::CalloutDispatchFailed,
            ]
            .map(Counter::name),
        );
        names
    }
}

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
        for reason in REJECTION_REASONS {
            assert!(Counter::WritesRejected(reason).name().ends_with(reason));
        }
    }
}
