//! Plans and renders the filter-bench "10,000 small rows" body N times (default 1): a native
//! profile target (`valgrind --tool=callgrind`) and a quick MB/s figure.

fn small_rows() -> Vec<u8> {
    let mut small = String::from("{\"upsert_rows\":[");
    for i in 0..10_000 {
        if i > 0 {
            small.push(',');
        }
        small.push_str(&format!(
            "{{\"id\":\"doc-{i}\",\"title\":\"title {i}\",\"score\":{},\"tags\":[\"a\",\"b\"],\"published\":true}}",
            i % 97
        ));
    }
    small.push_str("]}");
    small.into_bytes()
}

mod common;

fn main() {
    let n = common::times();
    let body = small_rows();
    let mut total = 0;
    let start = std::time::Instant::now();
    for _ in 0..n {
        total += common::plan_and_render(&body);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} bytes x {n}: {:.0} MB/s ({total})",
        body.len(),
        (body.len() * n) as f64 / 1e6 / secs
    );
}
