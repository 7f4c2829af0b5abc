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

/// Holds the filter's block-at-a-time scanner paths, as built for this target (wasm SIMD inside
/// wasmtime), to their byte-at-a-time reference at every offset of `len` bytes at `ptr`. Returns
/// how many offsets disagree.
///
/// # Safety
/// `ptr` must point at `len` initialised bytes.
#[no_mangle]
pub unsafe extern "C" fn bench_check_blocks(ptr: *const u8, len: u32) -> u32 {
    check_blocks(input(ptr, len))
}

pub fn check_blocks(bytes: &[u8]) -> u32 {
    use hevlayer_filter::scan::blocks;
    let special = |k: usize| {
        let mut one = [b' '; 16];
        one[0] = bytes[k];
        blocks::reference(&one).special & 1 != 0
    };
    let mut wrong = 0;
    for at in 0..bytes.len() {
        let mut ok = true;
        if let Some(block) = bytes.get(at..at + 16).and_then(|b| <&[u8; 16]>::try_from(b).ok()) {
            ok &= blocks::classify(bytes, at) == Some(blocks::reference(block));
        }
        if let Some(chunk) = bytes.get(at..at + 64).and_then(|b| <&[u8; 64]>::try_from(b).ok()) {
            ok &= blocks::wide(bytes, at) == Some(blocks::reference_wide(chunk));
        }
        let end = blocks::plain_run(bytes, at);
        ok &= (at..end).all(|k| !special(k)) && (bytes.len() - end < 16 || special(end));
        if let Some(close) = blocks::plain_string_end(bytes, at) {
            ok &= (at..close).all(|k| !special(k)) && bytes[close] == b'"';
        }
        wrong += u32::from(!ok);
    }
    wrong
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

    #[test]
    fn the_native_block_paths_pass_the_check() {
        let bytes: Vec<u8> = (0..2000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert_eq!(check_blocks(&bytes), 0);
        assert_eq!(check_blocks(br#"{"a":"b\"c","v":[1.5,-2e3,0]}"#), 0);
    }
}
