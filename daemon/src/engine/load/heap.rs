//! glibc malloc settings around model loading, which decide how much of what loading frees
//! the process keeps.
//!
//! Loading allocates and frees whole weight tensors in turn: the decoded protobuf, tract's
//! tensors, packed copies. glibc serves a large allocation from its own mapping only while it
//! is above a threshold that starts at 128 KiB and rises to the size of every such mapping
//! freed (up to 32 MiB); after the first weights are freed, the next ones come from the heap,
//! whose freed pages stay resident. Holding the threshold at 128 KiB while loading returns
//! each freed tensor to the kernel at once. Peak RSS in `mulmd probe` (VmHWM), release build,
//! with the same threshold set through `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072`:
//! mulm-28m f32 220 → 168 MB, SmolLM2-135M f32 882 → 688 MB.

/// Allocations of this size or more get their own mapping while a model loads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const LOADING_MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// After loading, the values glibc's own adjustment reaches once large blocks have been freed
/// (its maximum threshold on 64-bit, and twice that for trimming), so requests run with the
/// allocator behaving as it did before this module existed: per-token tensors of a few hundred
/// KiB (logits, KV caches) are reused from the heap rather than mapped and faulted in afresh.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const SERVING_MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const SERVING_TRIM_THRESHOLD: libc::c_int = 64 * 1024 * 1024;

/// Held for the duration of a model load. Dropping it restores the serving settings and hands
/// the heap that loading freed back to the kernel.
///
/// The settings are process-wide: another thread allocating during a load gets the loading
/// threshold too, which costs it speed, never correctness.
pub(crate) struct LoadingHeap(());

impl LoadingHeap {
    pub(crate) fn begin() -> Self {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; no memory is touched.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD);
        }
        LoadingHeap(())
    }
}

impl Drop for LoadingHeap {
    fn drop(&mut self) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters, and malloc_trim only returns free
        // heap pages to the kernel; neither touches live data.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD);
            // A daemon lives with its steady state for days, on boards with a few GB shared
            // with the rest of the home: a loaded mulm-28m f32 sat at 222 MB resident with
            // 134 MB in use before this trim (SmolLM2 f32: 958 vs 548 MB).
            libc::malloc_trim(0);
        }
    }
}
