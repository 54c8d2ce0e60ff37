//! Splitting one matrix product over the threads of a [`Team`]: each thread writes its own
//! columns of the output, so no two write the same element and nothing is merged afterwards.
//! Other work that falls into independent parts (attention's tiles) splits with [`split_parts`].

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tract_linalg::multithread::Executor;

use super::team::Team;

/// Multiply-adds (m · n · k) below which a product stays on one thread. Handing shares to
/// awake helpers costs well under a microsecond (see `team`); at 2 threads, mulm-28m q4
/// decoded 1330 tok/s with this at 2^20 (only the head and prompt products split), ~1550 at
/// 2^17 and 2^18, ~1590 at 2^16 (`mulmd probe --threads 2 --runs 5 --tokens 64`, three
/// rounds each; 1 thread: ~1150).
pub const PARALLEL_PRODUCT: usize = 1 << 16;

/// A kernel's share of an `[m, n]` row-major output: the columns (weight rows) `cols` of every
/// row. Shares of one output cover disjoint columns, so threads holding them never write the
/// same element.
pub struct OutputShare<'a> {
    ptr: *mut f32,
    n: usize,
    rows: usize,
    cols: Range<usize>,
    _output: PhantomData<&'a mut [f32]>,
}

// SAFETY: a share writes only its own columns (checked in `at`), disjoint from its siblings'.
unsafe impl Send for OutputShare<'_> {}

impl<'a> OutputShare<'a> {
    pub fn whole(out: &'a mut [f32], n: usize) -> Self {
        Self { ptr: out.as_mut_ptr(), n, rows: out.len() / n, cols: 0..n, _output: PhantomData }
    }

    fn same_output(&self) -> Self {
        Self { ptr: self.ptr, n: self.n, rows: self.rows, cols: self.cols.clone(), _output: PhantomData }
    }

    pub fn cols(&self) -> Range<usize> {
        self.cols.clone()
    }

    /// Where `len` outputs of row `r` from column `j` go; they must lie in this share.
    pub fn at(&self, r: usize, j: usize, len: usize) -> *mut f32 {
        assert!(r < self.rows && self.cols.start <= j && j + len <= self.cols.end, "write outside the share");
        // SAFETY: in bounds of the output: r < rows, j + len <= n.
        unsafe { self.ptr.add(r * self.n + j) }
    }

    pub fn set(&self, r: usize, j: usize, value: f32) {
        // SAFETY: `at` checked the element is this share's; no other share writes it.
        unsafe { *self.at(r, j, 1) = value }
    }
}

/// One output cut into column shares for the threads of a team: share `i` is columns
/// `i · width ..`, a multiple of the alignment wide but the last, and each is handed out once.
/// Nothing is allocated per product: which shares are out is one bit each.
struct ColumnShares<'a> {
    whole: OutputShare<'a>,
    width: usize,
    count: usize,
    taken: AtomicU64,
}

// SAFETY: `take` hands out each share at most once (the `taken` bits), and shares cover
// disjoint columns, so threads sharing a `&ColumnShares` never write the same element.
unsafe impl Sync for ColumnShares<'_> {}

impl<'a> ColumnShares<'a> {
    /// At most `parts` shares (and at most 64) of `out`, `[rows, n]` row-major.
    pub fn new(out: &'a mut [f32], n: usize, parts: usize, align: usize) -> Self {
        let parts = parts.clamp(1, u64::BITS as usize);
        let width = n.div_ceil(parts).div_ceil(align).max(1) * align;
        Self { whole: OutputShare::whole(out, n), width, count: n.div_ceil(width), taken: AtomicU64::new(0) }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Share `i`; panics if it was taken before.
    pub fn take(&self, i: usize) -> OutputShare<'a> {
        assert!(i < self.count, "share {i} of {}", self.count);
        let bit = 1u64 << i;
        assert!(self.taken.fetch_or(bit, Ordering::Relaxed) & bit == 0, "share {i} taken twice");
        let n = self.whole.n;
        OutputShare { cols: i * self.width..((i + 1) * self.width).min(n), ..self.whole.same_output() }
    }
}

/// Runs `kernel` over the whole `[m, n]` output `out`, split into column shares (multiples of
/// `align` wide but the last) over as many threads as the pool tract runs the plan with
/// (`--threads`), when the product has `macs` ≥ [`PARALLEL_PRODUCT`] multiply-adds; on this
/// thread alone otherwise.
pub fn split_columns(macs: usize, out: &mut [f32], n: usize, align: usize, kernel: &(dyn Fn(OutputShare) + Sync)) {
    let Some(team) = team_for(macs) else { return kernel(OutputShare::whole(out, n)) };
    // Twice as many shares as threads, taken in turn, so a thread that started late or runs
    // slower still finishes close to the others.
    let shares = ColumnShares::new(out, n, 2 * team.threads(), align);
    team.run(shares.count(), &|i| kernel(shares.take(i)));
}

/// Runs `part(i)` once for every `i` in `0..count`: spread over the threads of the pool tract
/// runs the plan with (`--threads`) when the work has `macs` ≥ [`PARALLEL_PRODUCT`]
/// multiply-adds, each part taken by whichever thread is free next; on this thread, in order,
/// otherwise. The parts must not write the same memory.
pub fn split_parts(macs: usize, count: usize, part: &(dyn Fn(usize) + Sync)) {
    match team_for(macs) {
        Some(team) => team.run(count, part),
        None => (0..count).for_each(part),
    }
}

/// The team that work of `macs` multiply-adds is split over, or `None` to run it on this
/// thread: a single-threaded plan, a team of one, or too little work to share.
fn team_for(macs: usize) -> Option<Arc<Team>> {
    let threads = match tract_linalg::multithread::current_tract_executor() {
        Executor::MultiThread(pool) if macs >= PARALLEL_PRODUCT => pool.current_num_threads(),
        _ => return None,
    };
    Some(Team::for_threads(threads)).filter(|team| team.threads() >= 2)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_column_once_in_aligned_widths() {
        for (n, parts, align) in [(64, 2, 8), (12288, 2, 8), (1032, 3, 8), (24, 4, 8), (8, 3, 8), (7, 2, 8), (1408, 4, 16), (40, 3, 16)] {
            let mut out = vec![0f32; 2 * n];
            let split = ColumnShares::new(&mut out, n, parts, align);
            let shares: Vec<OutputShare> = (0..split.count()).map(|i| split.take(i)).collect();
            assert!(shares.len() <= parts);
            let mut next = 0;
            for share in &shares {
                assert_eq!(share.cols().start, next, "n = {n}: shares must tile the columns in order");
                assert!(share.cols().start % align == 0, "n = {n}: a share must start on a multiple of {align}");
                next = share.cols().end;
            }
            assert_eq!(next, n);
        }
    }

    #[test]
    #[should_panic(expected = "taken twice")]
    fn a_share_is_handed_out_once() {
        let mut out = vec![0f32; 64];
        let split = ColumnShares::new(&mut out, 64, 2, 8);
        let _first = split.take(1);
        let _again = split.take(1);
    }
}
