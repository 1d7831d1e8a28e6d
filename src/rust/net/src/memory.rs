//! Handing freed memory back to the system.
//!
//! An update is read on the runtime's threads into a vector that R then
//! copies and frees. glibc keeps such freed blocks in the arena of the
//! thread that allocated them (its mmap threshold grows past 8 MB after the
//! first large block is freed), so every node's upload buffer stayed in the
//! server's resident memory after R took its numbers: measured at d = 1e6,
//! the server's peak grew by 1.7 d-vectors per node where the updates kept
//! are 1 (bench/network.R). Trimming after R takes a large update gives
//! those pages back at once; a fixed `MALLOC_MMAP_THRESHOLD_` would too, but
//! it slowed every large allocation of the R process (rounds 40 % slower).

/// Below this many bytes freed, trimming is not worth its cost.
pub const TRIM_BYTES: usize = 1 << 20;

/// Gives the free pages of every malloc arena back to the system (glibc);
/// does nothing elsewhere.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc holds free; it is
    // safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
