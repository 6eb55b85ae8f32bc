//! Process-wide settings every binary applies first.

/// mimalloc returns freed pages to the OS after a short delay; training frees and re-allocates
/// the same large activation buffers every step, so the kernel ends up zeroing fresh pages
/// (measured: 17% of a bench step in `clear_page`). Keep freed memory for reuse instead.
pub fn tune_allocator() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // Memory-bound runs (offload) set MIMALLOC_PURGE_DELAY themselves to give memory back.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: plain option setter of the linked mimalloc; valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}
