//! The agent's heap between deploys: glibc's malloc is set up in `main` (`bound_malloc`) to
//! keep the megabyte buffers of a transfer (1 MiB chunks in and out, 4 MiB write blocks) in
//! its heap while the transfer runs, so each is reused rather than mapped, faulted in page by
//! page, zeroed and unmapped again; [`give_back`] returns what the heap holds free to the
//! system once a deploy's fetch and unpack, or a peer's transfer, is over, so the agent's
//! resident memory between rollouts stays what it was.

/// Returns the free memory of every malloc arena to the system (`malloc_trim`). Blocking
/// (it walks the heaps): call it from the blocking pool. A no-op where the allocator is not
/// glibc's.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps; it takes the
    // arenas' locks like any allocation and touches no memory the program holds.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`give_back`] on the blocking pool, without waiting for it.
pub fn give_back_soon() {
    tokio::task::spawn_blocking(give_back);
}
