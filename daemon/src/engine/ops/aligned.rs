//! Memory that starts on a cache line.

/// Bytes that start on a cache line, so no 32-byte load of a block straddles two lines.
///
/// A `Vec<u8>` starts wherever malloc puts it: 16 bytes past a page boundary for a block with a
/// mapping of its own, as every weight has since `engine::heap` maps large allocations
/// individually while loading. mulm-28m q4 decoded about 11% slower that way (`mulmd probe
/// --runs 5 --tokens 64`, four rounds interleaved with the build before it: median 1078 vs
/// 1215 tok/s); aligned, the two were level (1159 vs 1132).
pub struct CacheAligned {
    lines: Vec<CacheLine>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

impl CacheAligned {
    /// `len` zero bytes.
    ///
    /// Allocated zeroed rather than written: `vec![line; n]` stores every line, while memory
    /// fresh from the kernel is zero already and a zeroed allocation skips it (a KV cache of a
    /// 1,000-token prompt is 50 MB, allocated again whenever the cache outgrows its room).
    pub fn zeroed(len: usize) -> Self {
        let lines = len.div_ceil(64);
        if lines == 0 {
            return Self { lines: Vec::new(), len };
        }
        let layout = std::alloc::Layout::array::<CacheLine>(lines).expect("a buffer that fits in memory");
        // SAFETY: the layout is non-zero-sized; all-zero bytes are a valid CacheLine; the
        // pointer comes from the global allocator with the layout `Vec<CacheLine>` uses for
        // a capacity of `lines`, so the Vec owns and frees it.
        unsafe {
            let ptr = std::alloc::alloc_zeroed(layout).cast::<CacheLine>();
            if ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            Self { lines: Vec::from_raw_parts(ptr, lines, lines), len }
        }
    }
}

impl std::ops::Deref for CacheAligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: a CacheLine is 64 initialized bytes and no padding (repr(C), one [u8; 64]),
        // so `lines` is `64 · lines.len() >= len` contiguous initialized bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }
}

impl std::ops::DerefMut for CacheAligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl CacheAligned {
    /// The bytes as float32 values (`len` must be a multiple of 4).
    pub fn floats(&self) -> &[f32] {
        assert!(self.len.is_multiple_of(4), "{} bytes are not whole floats", self.len);
        // SAFETY: the lines are 64-byte aligned (so 4-byte aligned), `len` bytes of them are
        // initialized (see `deref`), and every bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len / 4) }
    }

    /// [`CacheAligned::floats`], writable.
    pub fn floats_mut(&mut self) -> &mut [f32] {
        assert!(self.len.is_multiple_of(4), "{} bytes are not whole floats", self.len);
        // SAFETY: as in `floats`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len / 4) }
    }
}
