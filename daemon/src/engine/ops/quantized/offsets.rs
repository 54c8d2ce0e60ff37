//! The second term of a product whose weight keeps GGML's Q4_1 blocks.
//!
//! A Q4_1 block stands for `code · d + m` (codes 0..15, a scale `d` and a minimum `m`). A file
//! from `mulm-export` writes it as a 4-bit MatMulNBits holding the codes and scales, which
//! reads a code as `(code − 8) · d` (the module contract of `quantized`), plus each block's
//! offset `c = m + 8·d` times the sum of the activation's block:
//! `y[r, j] = product[r, j] + Σ_b c[j, b] · Σ_{i in block b} x[r, i]`, the sums over the
//! activation as it is (float32, not quantized), as onnxruntime runs the same graph. The
//! loader (`load::matmul_nbits`) takes the graph's four nodes for that term out and
//! [`attach`]es the offsets to the product's weight; the product rewrite gives them to the
//! [`super::Weights`] it builds, which add the term after their integer product.
//!
//! Why not an op of its own: one between the product and what reads it kept tract from
//! folding the head split of q, k and v into the product, and SmolLM2's decode step then ran
//! 30 attention products on tract's kernels and 90 more reshapes. Why not in the kernels:
//! the term costs one float multiply-add per block of 32 weights, a thirty-second of the
//! product, and leaving it out keeps every kernel path the same for Q4_0, Q4_1 and Q8_0.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::Blob;

use super::BLOCK;
use crate::engine::ops::f32_products::PanelWeights;
use crate::engine::ops::product_rewrite::WeightAxes;
use crate::engine::ops::stored::{RecordReader, RecordWriter, StoredWeights};

/// `y + (block sums of x) · C` for block offsets `C` of `[k/32, n]`.
#[derive(Debug, Clone)]
pub struct BlockOffsets {
    n: usize,
    k: usize,
    /// The offsets as a float32 weight of `n` outputs × `k/32` inputs, on the engine's float
    /// product kernels: the term is a product of the block sums with it, streamed once a step
    /// and split over threads like any other (a loop of short dot products took as long as the
    /// 4-bit product itself on SmolLM2's prompt).
    offsets: Arc<PanelWeights>,
}

impl BlockOffsets {
    /// Offsets of `k / 32` blocks × `n` outputs, `[k/32, n]` row-major, as the file holds them.
    pub fn new(offsets: &[f32], n: usize, k: usize) -> Result<Self, String> {
        let blocks = k / BLOCK;
        if k % BLOCK != 0 || n == 0 || offsets.len() != n * blocks {
            return Err(format!("block offsets of a {n} × {k} weight are {blocks} × {n} values, got {}", offsets.len()));
        }
        let tensor = Tensor::from_shape(&[blocks, n], offsets).map_err(|e| e.to_string())?;
        let axes = WeightAxes { n, k: blocks, n_axis: 1, contracted: vec![0] };
        let offsets = PanelWeights::new(&tensor, &axes).map_err(|e| e.to_string())?;
        Ok(Self { n, k, offsets: Arc::new(offsets) })
    }

    /// Writes the offsets (their float32 panels) into a plan-cache record.
    pub(super) fn store<W: std::io::Write>(&self, out: &mut RecordWriter<W>) -> std::io::Result<()> {
        self.offsets.store(out)
    }

    /// Reads what [`BlockOffsets::store`] wrote, for a weight of `n` × `k`.
    pub(super) fn restore(from: &mut RecordReader, n: usize, k: usize) -> Result<Self, String> {
        let offsets = PanelWeights::restore(from)?;
        if (offsets.n, offsets.k) != (n, k / BLOCK) {
            return Err(format!("block offsets of {} × {} stored for a {n} × {k} weight", offsets.n, offsets.k));
        }
        Ok(Self { n, k, offsets: Arc::new(offsets) })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Adds the term to `y` (`m` rows of `n`) for `x` (`m` rows of `k`).
    pub fn add_to(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert!(x.len() == m * self.k && y.len() == m * self.n, "x must be m × k and y m × n");
        thread_local! {
            // The block sums and the term, reused from product to product.
            static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        BUFFERS.with(|buffers| {
            let (sums, term) = &mut *buffers.borrow_mut();
            sums.clear();
            sums.extend(x.chunks_exact(BLOCK).map(|block| block.iter().sum::<f32>()));
            term.resize(y.len(), 0.0);
            self.offsets.matmul(sums, m, term);
            y.iter_mut().zip(term.iter()).for_each(|(y, t)| *y += t);
        })
    }
}

thread_local! {
    /// Offsets waiting for their product, by the address of the weight's block bytes (shared,
    /// not copied, by every clone of the constant), from the loader to the product rewrite,
    /// which run on the loading thread.
    static PENDING: RefCell<HashMap<usize, BlockOffsets>> = RefCell::new(HashMap::new());
}

/// Attaches offsets to the block-quantized constant whose bytes are `blocks`.
pub fn attach(blocks: &Arc<Blob>, offsets: BlockOffsets) {
    PENDING.with(|p| p.borrow_mut().insert(Arc::as_ptr(blocks) as usize, offsets));
}

/// The offsets attached to `blocks`, taken.
pub fn take(blocks: &Arc<Blob>) -> Option<BlockOffsets> {
    PENDING.with(|p| p.borrow_mut().remove(&(Arc::as_ptr(blocks) as usize)))
}

/// Drops every attachment: a load starts with none, and one left after the rewrite is an
/// error (see `use_quantized_products`), not something a later load may find.
pub fn forget_all() -> usize {
    PENDING.with(|p| p.borrow_mut().drain().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The term is each block's offset times the block's sum, per output and row.
    #[test]
    fn adds_each_blocks_offset_times_the_blocks_sum() {
        let (n, k) = (19, 64);
        // [k/32, n], as a file holds them.
        let offsets: Vec<f32> = (0..2 * n).map(|i| i as f32 * 0.25 - 2.5).collect();
        let op = BlockOffsets::new(&offsets, n, k).unwrap();
        for m in [1, 2, 5] {
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.31).sin()).collect();
            let mut y: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
            op.add_to(&x, m, &mut y);
            for r in 0..m {
                for j in 0..n {
                    let sum = |b: usize| x[r * k + b * 32..][..32].iter().sum::<f32>();
                    let want = (r * n + j) as f32 + offsets[j] * sum(0) + offsets[n + j] * sum(1);
                    assert!((y[r * n + j] - want).abs() <= 1e-5 * want.abs().max(1.0), "m {m}: y[{r}, {j}] = {}, want {want}", y[r * n + j]);
                }
            }
        }
    }

    /// Offsets whose product the rewrite did not take would be silently dropped by tract's
    /// own product: the load fails instead, and nothing stays attached for a later load.
    #[test]
    fn offsets_left_without_their_product_stop_the_load() {
        let blocks = Arc::new(Blob::from_bytes(&[0u8; 18]).unwrap());
        attach(&blocks, BlockOffsets::new(&[0.5], 1, 32).unwrap());
        let err = super::super::use_quantized_products(&mut TypedModel::default()).unwrap_err();
        assert!(format!("{err:#}").contains("Q4_1"), "{err:#}");
        assert_eq!(forget_all(), 0);
    }

    #[test]
    fn offsets_of_the_wrong_size_are_refused() {
        let err = BlockOffsets::new(&[0.0; 5], 3, 64).unwrap_err();
        assert!(err.contains("2 × 3 values, got 5"), "{err}");
    }
}
