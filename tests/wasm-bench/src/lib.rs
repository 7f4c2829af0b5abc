//! A benchmark-only module built for `wasm32-wasip1` beside the filter, so the filter's write core
//! and the `serde_json::Value` parse-and-reserialize baseline run in the same runtime on the same
//! bytes. The host copies a body in with `bench_alloc`, calls `bench_core` or `bench_value` (each
//! returns the output length, or `u32::MAX` on error) and frees it with `bench_free`.

use hevlayer_filter::write::{plan, render};

/// Allocates `len` bytes for the host to fill.
#[no_mangle]
pub extern "C" fn bench_alloc(len: u32) -> *mut u8 {
    let mut buf = Vec::<u8>::with_capacity(len as usize);
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

/// Frees a buffer from `bench_alloc`.
///
/// # Safety
/// `ptr` and `len` must come from one `bench_alloc` call.
#[no_mangle]
pub unsafe extern "C" fn bench_free(ptr: *mut u8, len: u32) {
    drop(Vec::from_raw_parts(ptr, 0, len as usize));
}

/// # Safety
/// `ptr` must point at `len` initialised bytes.
unsafe fn input<'a>(ptr: *const u8, len: u32) -> &'a [u8] {
    std::slice::from_raw_parts(ptr, len as usize)
}

/// Validates and stamps a write body the way the filter does.
///
/// # Safety
/// `ptr` must point at `len` initialised bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_core(ptr: *const u8, len: u32) -> u32 {
    core(input(ptr, len))
}

/// Parses the body into a `serde_json::Value` and serialises it again.
///
/// # Safety
/// `ptr` must point at `len` initialised bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_value(ptr: *const u8, len: u32) -> u32 {
    value(input(ptr, len))
}

pub fn core(body: &[u8]) -> u32 {
    match plan(body) {
        Ok(p) => render(body, &p, 1_732_400_000_000).len() as u32,
        Err(_) => u32::MAX,
    }
}

pub fn value(body: &[u8]) -> u32 {
    match serde_json::from_slice::<serde_json::Value>(body).and_then(|v| serde_json::to_vec(&v)) {
        Ok(out) => out.len() as u32,
        Err(_) => u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_accept_a_write() {
        let body = br#"{"upsert_rows":[{"id":1,"vector":[0.5,1.5]}]}"#;
        assert_eq!(value(body) as usize, body.len());
        assert_eq!(
            core(body) as usize,
            body.len() + r#","_hevlayer_upserted_at":1732400000000"#.len()
        );
        assert_eq!(core(b"{}"), u32::MAX);
    }
}
