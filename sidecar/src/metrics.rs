//! Prometheus metrics, rendered in the text exposition format by `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::cache::mirror::OpTiming;
use crate::watermark::WatermarkReport;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Default)]
struct Inner {
    /// (route, method, status) -> count
    requests: BTreeMap<(String, String, u16), u64>,
    /// route -> latency histogram of the requests it served
    request_seconds: BTreeMap<String, Histogram>,
    /// (operation, result) -> latency histogram
    cache_ops: BTreeMap<(&'static str, &'static str), Histogram>,
    /// (kind, result) -> count: mirror / purge / fetch outcomes
    mirror: BTreeMap<(&'static str, &'static str), u64>,
    /// result -> count of namespace-metadata polls
    watermark_polls: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn record_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        *inner
            .requests
            .entry((route.to_owned(), method.to_owned(), status))
            .or_insert(0) += 1;
        if let Some(h) = inner.request_seconds.get_mut(route) {
            h.observe(elapsed.as_secs_f64());
        } else {
            let mut h = Histogram::default();
            h.observe(elapsed.as_secs_f64());
            inner.request_seconds.insert(route.to_owned(), h);
        }
    }

    pub fn record_cache_op(&self, op: &'static str, result: &'static str, elapsed: Duration) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .cache_ops
            .entry((op, result))
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// Records many cache operations under one lock (a mirror batch's single-document ops).
    pub fn record_cache_ops(&self, ops: &[OpTiming]) {
        if ops.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        for op in ops {
            inner
                .cache_ops
                .entry((op.op, op.result))
                .or_default()
                .observe(op.elapsed.as_secs_f64());
        }
    }

    pub fn record_event(&self, kind: &'static str, result: &'static str) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        *inner.mirror.entry((kind, result)).or_insert(0) += 1;
    }

    pub fn record_watermark_poll(&self, result: &'static str) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        *inner.watermark_polls.entry(result).or_insert(0) += 1;
    }

    /// Renders everything; `stages` are (pipeline, stage, documents) gauges, `leased` (pipeline,
    /// documents holding an unexpired lease) and `watermarks` the watermark state, all read at
    /// scrape time.
    pub fn render(
        &self,
        stages: &[(String, String, u64)],
        leased: &[(String, u64)],
        cache_connected: bool,
        watermarks: &WatermarkReport,
    ) -> String {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        out.push_str("# HELP hevlayer_sidecar_requests_total HTTP requests served, by route and status.\n");
        out.push_str("# TYPE hevlayer_sidecar_requests_total counter\n");
        for ((route, method, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "hevlayer_sidecar_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                escape(route),
                escape(method)
            );
        }
        out.push_str(
            "# HELP hevlayer_sidecar_request_seconds Time to answer a request, by route (callouts and pipeline routes).\n",
        );
        out.push_str("# TYPE hevlayer_sidecar_request_seconds histogram\n");
        for (route, h) in &inner.request_seconds {
            render_histogram(
                &mut out,
                "hevlayer_sidecar_request_seconds",
                &format!("route=\"{}\"", escape(route)),
                h,
            );
        }
        out.push_str(
            "# HELP hevlayer_sidecar_cache_op_seconds Document cache operations, by operation and result.\n",
        );
        out.push_str("# TYPE hevlayer_sidecar_cache_op_seconds histogram\n");
        for ((op, result), h) in &inner.cache_ops {
            render_histogram(
                &mut out,
                "hevlayer_sidecar_cache_op_seconds",
                &format!("op=\"{op}\",result=\"{result}\""),
                h,
            );
        }
        out.push_str("# HELP hevlayer_sidecar_mirror_total Mirror, purge, document-fetch and vectors stage-move outcomes.\n");
        out.push_str("# TYPE hevlayer_sidecar_mirror_total counter\n");
        for ((kind, result), n) in &inner.mirror {
            let _ = writeln!(
                out,
                "hevlayer_sidecar_mirror_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
            );
        }
        render_pipelines(&mut out, stages, leased);
        out.push_str(
            "# HELP hevlayer_sidecar_cache_connected Whether the document cache backend is usable.\n",
        );
        out.push_str("# TYPE hevlayer_sidecar_cache_connected gauge\n");
        let _ = writeln!(
            out,
            "hevlayer_sidecar_cache_connected {}",
            u8::from(cache_connected)
        );
        render_watermarks(&mut out, &inner.watermark_polls, watermarks);
        out
    }
}

/// One histogram's buckets, sum and count, under `labels` (already formatted).
fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    for (bound, n) in BUCKETS.iter().zip(h.buckets.iter()) {
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// The pipeline gauges: documents per stage, and those holding an unexpired lease.
fn render_pipelines(out: &mut String, stages: &[(String, String, u64)], leased: &[(String, u64)]) {
    out.push_str("# HELP hevlayer_sidecar_pipeline_documents Staged documents per pipeline and stage.\n");
    out.push_str("# TYPE hevlayer_sidecar_pipeline_documents gauge\n");
    for (pipeline, stage, n) in stages {
        let _ = writeln!(
            out,
            "hevlayer_sidecar_pipeline_documents{{pipeline=\"{}\",stage=\"{}\"}} {n}",
            escape(pipeline),
            escape(stage)
        );
    }
    out.push_str(
        "# HELP hevlayer_sidecar_pipeline_leased Documents holding an unexpired lease, per pipeline.\n",
    );
    out.push_str("# TYPE hevlayer_sidecar_pipeline_leased gauge\n");
    for (pipeline, n) in leased {
        let _ = writeln!(
            out,
            "hevlayer_sidecar_pipeline_leased{{pipeline=\"{}\"}} {n}",
            escape(pipeline)
        );
    }
}

fn render_watermarks(out: &mut String, polls: &BTreeMap<&'static str, u64>, report: &WatermarkReport) {
    out.push_str("# HELP hevlayer_sidecar_watermark_polls_total Namespace-metadata polls, by result.\n");
    out.push_str("# TYPE hevlayer_sidecar_watermark_polls_total counter\n");
    for (result, n) in polls {
        let _ = writeln!(
            out,
            "hevlayer_sidecar_watermark_polls_total{{result=\"{result}\"}} {n}"
        );
    }
    out.push_str("# HELP hevlayer_sidecar_watermark_namespaces Namespaces watched, by state.\n");
    out.push_str("# TYPE hevlayer_sidecar_watermark_namespaces gauge\n");
    let stable = report.namespaces - report.updating.min(report.namespaces);
    let _ = writeln!(
        out,
        "hevlayer_sidecar_watermark_namespaces{{state=\"all\"}} {}",
        report.namespaces
    );
    let _ = writeln!(
        out,
        "hevlayer_sidecar_watermark_namespaces{{state=\"updating\"}} {}",
        report.updating
    );
    let _ = writeln!(
        out,
        "hevlayer_sidecar_watermark_namespaces{{state=\"unknown\"}} {}",
        report.unknown
    );
    let _ = writeln!(
        out,
        "hevlayer_sidecar_watermark_namespaces{{state=\"not_updating\"}} {stable}"
    );
    out.push_str(
        "# HELP hevlayer_sidecar_watermark_age_seconds How far each watermark is behind now (the oldest ones only, WATERMARK_METRICS_NAMESPACES of them).\n",
    );
    out.push_str("# TYPE hevlayer_sidecar_watermark_age_seconds gauge\n");
    for (namespace, age) in &report.oldest {
        let _ = writeln!(
            out,
            "hevlayer_sidecar_watermark_age_seconds{{namespace=\"{}\"}} {age}",
            escape(namespace)
        );
    }
    out.push_str("# HELP hevlayer_sidecar_watermark_max_age_seconds The oldest watermark's age.\n");
    out.push_str("# TYPE hevlayer_sidecar_watermark_max_age_seconds gauge\n");
    if let Some(age) = report.max_age_seconds {
        let _ = writeln!(out, "hevlayer_sidecar_watermark_max_age_seconds {age}");
    }
}
