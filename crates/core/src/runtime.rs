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

/// candle's element-wise thread pool keeps its workers spinning ~25,000 rounds after each op;
/// on a few cores they take the cores the matrix products (on rayon's threads) need next.
/// Parking at once measured 20% more tokens/s on the 2-core bench step
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0` vs the default, alternating runs). A value the user set
/// wins. Call first thing in `main`, before any other thread or tensor op exists.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any other thread exists: nothing reads the environment concurrently.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
}

/// Minor page faults of this process so far (`/proc/self/stat`); `None` where `/proc` does not
/// say. A step that reuses its buffers (the allocator keeps freed pages, `tune_allocator`)
/// touches no fresh pages, so the count stays flat from one step to the next.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, minflt field 10.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(7)?.parse().ok()
}

/// This process's peak resident set (VmHWM) in bytes; `None` where `/proc` does not say.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
