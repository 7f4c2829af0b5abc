//! Plans and renders a filter-bench-like vector write N times (default 1): 100 rows of 1536
//! floats, as JSON number arrays (`numbers`, the default) or as base64 strings (`base64`). A
//! native profile target (`valgrind --tool=callgrind`) and a quick MB/s figure.
//!
//! `cargo run --release -p hevlayer-filter --example vectors -- base64 20`

/// The filter-bench's pseudo-random stream, so the numbers are spelled alike.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    fn next_f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The rows' vectors: number arrays, or base64 text as long as 1536 f32s encoded (its bytes
/// are arbitrary: the scanner only skips them).
fn body(base64: bool) -> Vec<u8> {
    let mut rng = Lcg(42);
    let dims = 1536;
    let mut text = String::from("{\"upsert_rows\":[");
    for i in 0..100 {
        if i > 0 {
            text.push(',');
        }
        let vector = if base64 {
            let encoded: String = (0..dims * 4 * 4 / 3)
                .map(|_| BASE64[(rng.next() >> 58) as usize] as char)
                .collect();
            format!("\"{encoded}\"")
        } else {
            let numbers: Vec<String> = (0..dims).map(|_| rng.next_f32().to_string()).collect();
            format!("[{}]", numbers.join(","))
        };
        text.push_str(&format!(
            "{{\"id\":{i},\"vector\":{vector},\"title\":\"document {i}\",\"source\":\"bench\"}}"
        ));
    }
    text.push_str("],\"distance_metric\":\"cosine_distance\"}");
    text.into_bytes()
}

mod common;

fn main() {
    let mut args = std::env::args().skip(1);
    let base64 = match args.next().as_deref() {
        None | Some("numbers") => false,
        Some("base64") => true,
        Some(other) => {
            eprintln!("unknown fixture {other:?} (numbers or base64)");
            std::process::exit(2);
        }
    };
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let body = body(base64);
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
