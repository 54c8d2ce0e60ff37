//! Memory that starts on a cache line.

use std::sync::Arc;

use memmap2::Mmap;

/// Bytes that start on a cache line, so no 32-byte load of a block straddles two lines.
///
/// A `Vec<u8>` starts wherever malloc puts it: 16 bytes past a page boundary for a block with a
/// mapping of its own, as every weight has since `engine::heap` maps large allocations
/// individually while loading. mulm-28m q4 decoded about 11% slower that way (`mulmd probe
/// --runs 5 --tokens 64`, four rounds interleaved with the build before it: median 1078 vs
/// 1215 tok/s); aligned, the two were level (1159 vs 1132).
///
/// Or bytes of a mapped file (a plan cache's weights, see `stored`): read-only, they are
/// copied to memory of their own the first time they are borrowed mutably.
pub struct CacheAligned {
    storage: Storage,
    len: usize,
}

enum Storage {
    Lines(Vec<CacheLine>),
    /// `len` bytes of `map` from `offset`, a multiple of 64 (the map starts on a page).
    Mapped { map: Arc<Mmap>, offset: usize },
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
            return Self { storage: Storage::Lines(Vec::new()), len };
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
            Self { storage: Storage::Lines(Vec::from_raw_parts(ptr, lines, lines)), len }
        }
    }

    /// `len` bytes of `map` from `offset`, without copying them; `offset` must be a multiple
    /// of 64 and the bytes within the map.
    pub fn mapped(map: Arc<Mmap>, offset: usize, len: usize) -> Result<Self, String> {
        if !offset.is_multiple_of(64) || offset.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(format!("{len} bytes at {offset} are not a cache-aligned part of a {}-byte map", map.len()));
        }
        Ok(Self { storage: Storage::Mapped { map, offset }, len })
    }

    /// Whether the bytes are a mapped file's.
    #[cfg(test)]
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

impl std::ops::Deref for CacheAligned {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.storage {
            // SAFETY: a CacheLine is 64 initialized bytes and no padding (repr(C), one [u8; 64]),
            // so `lines` is `64 · lines.len() >= len` contiguous initialized bytes.
            Storage::Lines(lines) => unsafe { std::slice::from_raw_parts(lines.as_ptr().cast::<u8>(), self.len) },
            Storage::Mapped { map, offset } => &map[*offset..*offset + self.len],
        }
    }
}

impl std::ops::DerefMut for CacheAligned {
    fn deref_mut(&mut self) -> &mut [u8] {
        if let Storage::Mapped { map, offset } = &self.storage {
            let mut own = Self::zeroed(self.len);
            own.copy_from_slice(&map[*offset..*offset + self.len]);
            *self = own;
        }
        let Storage::Lines(lines) = &mut self.storage else { unreachable!("copied to lines just above") };
        // SAFETY: as in `deref`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl CacheAligned {
    /// The bytes as float32 values (`len` must be a multiple of 4).
    pub fn floats(&self) -> &[f32] {
        assert!(self.len.is_multiple_of(4), "{} bytes are not whole floats", self.len);
        let bytes: &[u8] = self;
        // SAFETY: the bytes start 64-byte aligned (lines, or a map's page plus a multiple of
        // 64), so 4-byte aligned; all `len` of them are initialized (see `deref`), and every
        // bit pattern is a valid f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), self.len / 4) }
    }

    /// [`CacheAligned::floats`], writable.
    pub fn floats_mut(&mut self) -> &mut [f32] {
        assert!(self.len.is_multiple_of(4), "{} bytes are not whole floats", self.len);
        let len = self.len;
        let bytes: &mut [u8] = self;
        // SAFETY: as in `floats` (mutable bytes are always lines), and the borrow of `self`
        // is exclusive.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), len / 4) }
    }
}
