//! Laid-out weights as bytes, for the plan cache (`load::plan_cache`): a weight is written once
//! in the layout its kernels read and read back into that layout, so a cached load skips the
//! model file's decoding and every repacking.
//!
//! A record is little-endian `u64` fields followed by raw arrays in the machine's own order
//! (every target the engine builds for is little-endian, and the cache's key names the target).
//! A reader checks each array's length against what the record's own fields imply and against
//! the bytes left in the record before it allocates: a damaged file gives an error, never a
//! huge allocation or a misread weight.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use super::aligned::CacheAligned;

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

    pub fn floats(&mut self, values: &[f32]) -> io::Result<()> {
        // Through a bounded buffer: scales run to millions of values.
        for chunk in values.chunks(16 * 1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.bytes(&bytes)?;
        }
        Ok(())
    }
}

/// Reads one record, `[at, end)` of a file, front to back.
pub struct RecordReader<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl<'a> RecordReader<'a> {
    pub fn new(file: &'a File, at: u64, len: u64) -> Self {
        Self { file, at, end: at.saturating_add(len) }
    }

    fn take(&mut self, len: u64, what: &str) -> Result<u64, String> {
        if len > self.end - self.at {
            return Err(format!("{what} needs {len} bytes, the record has {} left", self.end - self.at));
        }
        let from = self.at;
        self.at += len;
        Ok(from)
    }

    /// Fills `buf` from the record.
    pub fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), String> {
        let from = self.take(buf.len() as u64, what)?;
        self.file.read_exact_at(buf, from).map_err(|e| format!("reading {what}: {e}"))
    }

    pub fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A size field, refused above `max`.
    pub fn size(&mut self, what: &str, max: usize) -> Result<usize, String> {
        let v = self.u64(what)?;
        usize::try_from(v).ok().filter(|v| *v <= max).ok_or_else(|| format!("{what} is {v}, at most {max} fits"))
    }

    /// The bytes the record has left.
    pub fn left(&self) -> usize {
        usize::try_from(self.end - self.at).unwrap_or(usize::MAX)
    }

    /// `len` bytes into a cache-aligned buffer.
    pub fn aligned(&mut self, len: usize, what: &str) -> Result<CacheAligned, String> {
        self.take(len as u64, what)?;
        self.at -= len as u64;
        let mut buf = CacheAligned::zeroed(len);
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    /// `n` float32 values.
    pub fn floats(&mut self, n: usize, what: &str) -> Result<Vec<f32>, String> {
        let bytes = n.checked_mul(4).ok_or_else(|| format!("{what}: {n} floats overflow"))?;
        self.take(bytes as u64, what)?;
        self.at -= bytes as u64;
        let mut raw = vec![0u8; bytes];
        self.fill(&mut raw, what)?;
        Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
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
