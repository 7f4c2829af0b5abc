//! The body-buffer and header-map hostcalls, with every status reported to the caller.
//!
//! The SDK's `hostcalls::get_buffer`, `hostcalls::set_buffer` and `hostcalls::get_map` panic on a
//! status they do not expect (anything but Ok, and NotFound for reads), `get_map` also on a header
//! value that is not UTF-8 (see [`crate::pairs`]). In the filter a panic is a trap that leaves
//! the VM failed, and Envoy then fails every request on it; a body Envoy will not hand over or
//! replace is a fault with its own answer (a 500 and a counter, or an undone mirror that is
//! fenced). So these two calls go to the ABI directly, and any status comes back as an error.

use crate::pairs::Pairs;
use proxy_wasm::types::{BufferType, MapType};
use std::ptr::null_mut;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

// The SDK declares the same two imports with its own `Status` return type; a status outside that
// enum would be undefined behaviour there, so here the status is a plain `u32`.
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
}

/// A whole header map in one hostcall, kept as the host serialized it; a map the host does not
/// have (NotFound) is empty. `Err` carries the host's status.
pub fn pairs(map: MapType) -> Result<Pairs, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `read`.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    match status {
        OK if data.is_null() => Ok(Pairs::default()),
        // SAFETY: as in `read`: `size` bytes allocated through the module's allocator.
        OK => Ok(Pairs::from_serialized(unsafe {
            Vec::from_raw_parts(data, size, size)
        })),
        NOT_FOUND => Ok(Pairs::default()),
        status => Err(status),
    }
}

/// Up to `max` bytes of `buffer` from `start`; a buffer Envoy does not have (NotFound) is empty.
/// `Err` carries the host's status.
pub fn read(buffer: BufferType, start: usize, max: usize) -> Result<Vec<u8>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer and a length into the two out-parameters, which live
    // for the call.
    let status = unsafe { proxy_get_buffer_bytes(buffer as u32, start, max, &mut data, &mut size) };
    match status {
        OK if data.is_null() => Ok(Vec::new()),
        // SAFETY: on Ok the host allocated `size` bytes through the module's exported allocator
        // (`proxy_on_memory_allocate`, the SDK's: a boxed slice of exactly `size` bytes, the
        // layout of a Vec with that capacity), copied the bytes in and gave up the allocation.
        OK => Ok(unsafe { Vec::from_raw_parts(data, size, size) }),
        NOT_FOUND => Ok(Vec::new()),
        status => Err(status),
    }
}

/// Replaces `size` bytes of `buffer` at `start` with `value`. `Err` carries the host's status.
pub fn replace(buffer: BufferType, start: usize, size: usize, value: &[u8]) -> Result<(), u32> {
    // SAFETY: `value` outlives the call; the host copies it.
    let status = unsafe { proxy_set_buffer_bytes(buffer as u32, start, size, value.as_ptr(), value.len()) };
    match status {
        OK => Ok(()),
        status => Err(status),
    }
}
