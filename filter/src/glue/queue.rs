//! The shared-queue hostcalls that wake a worker's root context, with every status reported to
//! the caller (the SDK's versions panic on a status they do not expect; see `buffers`).
//!
//! A stream cannot send a callout whose answer must outlive it (Envoy gives the answer to the
//! context that sent it, and a finished stream has none). So a stream puts its write's mirror in
//! the worker's mirror queue and enqueues one byte on a queue the root context registered: Envoy
//! then calls the root's `on_queue_ready` on the same worker, after the stream's callback, and the
//! root sends the mirrors.

use std::ptr::null_mut;

const OK: u32 = 0;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_register_shared_queue(name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// Registers a queue whose items wake this root context. `Err` carries the host's status.
pub fn register(name: &str) -> Result<u32, u32> {
    let mut id = 0u32;
    // SAFETY: the name outlives the call; the host writes the id into `id`.
    let status = unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) };
    match status {
        OK => Ok(id),
        status => Err(status),
    }
}

/// Enqueues a one-byte wake-up.
pub fn wake(queue_id: u32) -> Result<(), u32> {
    let byte = [1u8];
    // SAFETY: the byte outlives the call; the host copies it.
    let status = unsafe { proxy_enqueue_shared_queue(queue_id, byte.as_ptr(), byte.len()) };
    match status {
        OK => Ok(()),
        status => Err(status),
    }
}

/// Takes every item off the queue (they carry nothing but the wake-up); returns how many.
pub fn drain(queue_id: u32) -> usize {
    let mut n = 0;
    // Bounded: a queue only this worker's streams write to holds at most one item per mirror.
    for _ in 0..100_000 {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        // SAFETY: the host writes a pointer and a length into the out-parameters.
        let status = unsafe { proxy_dequeue_shared_queue(queue_id, &mut data, &mut size) };
        if status != OK {
            // Empty (or the queue is gone): nothing more to take.
            break;
        }
        if !data.is_null() {
            // SAFETY: on Ok the host allocated `size` bytes through the module's allocator and
            // gave the allocation up (see `buffers::read`); it is freed here.
            drop(unsafe { Vec::from_raw_parts(data, size, size) });
        }
        n += 1;
    }
    n
}
