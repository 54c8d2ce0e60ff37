//! Laid-out weights as bytes, for the plan cache (`load::plan_cache`): a weight is written once
//! in the layout its kernels read and read back into that layout, so a cached load skips the
//! model file's decoding and every repacking.
//!
//! A record is little-endian `u64` fields followed by raw arrays in the machine's own order
//! (every target the engine builds for is little-endian, and the cache's key names the target).
//! A reader checks each array's length against what the record's own fields imply and against
//! the bytes left in the record before it allocates: a damaged file gives an error, never a
//! huge allocation or a misread weight.

use std::io::{self, Write};
use std::sync::Arc;

use memmap2::Mmap;

use super::aligned::CacheAligned;

/// Where a record's kernel arrays start: a cache line.
const ALIGN: usize = 64;

/// Appends records to a file, counting where each starts.
pub struct RecordWriter<W: Write> {
    out: W,
    at: u64,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, at: 0 }
    }

    /// Bytes written so far: the offset the next record starts at.
    pub fn position(&self) -> u64 {
        self.at
    }

    pub fn u64(&mut self, v: u64) -> io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    pub fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.at += b.len() as u64;
        Ok(())
    }

    /// Bytes a reader takes as [`CacheAligned`]: they start on a cache line of the file, so
    /// that they can stay where the file is mapped.
    pub fn aligned_bytes(&mut self, b: &[u8]) -> io::Result<()> {
        let pad = self.at.next_multiple_of(ALIGN as u64) - self.at;
        self.bytes(&[0u8; ALIGN][..pad as usize])?;
        self.bytes(b)
    }

    pub fn floats(&mut self, values: &[f32]) -> io::Result<()> {
        // Through a bounded buffer: scales run to millions of values.
        for chunk in values.chunks(16 * 1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(&bytes)?;
        }
        Ok(())
    }
}

/// Reads one record, `[at, end)` of a mapped file, front to back. The kernels' arrays are
/// not copied: they stay the map's pages (see [`CacheAligned::mapped`]), so a cached load
/// reads SmolLM2's 538 MB of float32 panels in the time the kernel takes to map them, where
/// reading them into fresh memory took 330 ms (bench/RESULTS.md, plan cache).
pub struct RecordReader<'a> {
    map: &'a Arc<Mmap>,
    at: usize,
    end: usize,
}

impl<'a> RecordReader<'a> {
    /// The record of `len` bytes at `at`; one that runs past the map is cut at its end (and
    /// its reader then finds bytes missing).
    pub fn new(map: &'a Arc<Mmap>, at: u64, len: u64) -> Self {
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX).min(map.len());
        let at = clamp(at);
        Self { map, at, end: clamp((at as u64).saturating_add(len)).max(at) }
    }

    fn take(&mut self, len: usize, what: &str) -> Result<usize, String> {
        if len > self.end - self.at {
            return Err(format!("{what} needs {len} bytes, the record has {} left", self.end - self.at));
        }
        let from = self.at;
        self.at += len;
        Ok(from)
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, String> {
        let from = self.take(8, what)?;
        Ok(u64::from_le_bytes(self.map[from..from + 8].try_into().expect("8 bytes")))
    }

    /// A size field, refused above `max`.
    pub fn size(&mut self, what: &str, max: usize) -> Result<usize, String> {
        let v = self.u64(what)?;
        usize::try_from(v).ok().filter(|v| *v <= max).ok_or_else(|| format!("{what} is {v}, at most {max} fits"))
    }

    /// The bytes the record has left.
    pub fn left(&self) -> usize {
        self.end - self.at
    }

    /// `len` bytes that [`RecordWriter::aligned_bytes`] wrote, as the map's own.
    pub fn aligned(&mut self, len: usize, what: &str) -> Result<CacheAligned, String> {
        self.take(self.at.next_multiple_of(ALIGN) - self.at, what)?;
        let from = self.take(len, what)?;
        CacheAligned::mapped(self.map.clone(), from, len)
    }

    /// `n` float32 values.
    pub fn floats(&mut self, n: usize, what: &str) -> Result<Vec<f32>, String> {
        let from = self.take(times(n, 4, what)?, what)?;
        Ok(self.map[from..from + 4 * n].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Ends the record: every byte must have been read.
    pub fn finish(self, what: &str) -> Result<(), String> {
        match self.end - self.at {
            0 => Ok(()),
            left => Err(format!("{what} leaves {left} bytes of its record unread")),
        }
    }
}

/// A laid-out weight that writes itself as a record and reads itself back.
pub trait StoredWeights: Sized {
    /// The record's first field, so a record is never read as another kind of weight.
    const TAG: u64;
    fn store<W: Write>(&self, out: &mut RecordWriter<W>) -> io::Result<()>;
    fn restore(from: &mut RecordReader) -> Result<Self, String>;
}

/// `a · b`, or an error naming `what` where it overflows (a damaged record's sizes).
pub fn times(a: usize, b: usize, what: &str) -> Result<usize, String> {
    a.checked_mul(b).ok_or_else(|| format!("{what}: {a} × {b} overflows"))
}
