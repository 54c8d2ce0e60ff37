//! The second term of a product whose weight keeps GGML's Q4_1 blocks.
//!
//! A Q4_1 block stands for `code · d + m` (codes 0..15, a scale `d` and a minimum `m`). A file
//! from `mulm-export` writes it as a 4-bit MatMulNBits holding the codes and scales, which
//! reads a code as `(code − 8) · d` (the module contract of `quantized`), plus each block's
//! offset `c = m + 8·d` times the sum of the activation's block:
//! `y[r, j] = product[r, j] + Σ_b c[j, b] · Σ_{i in block b} x[r, i]`, the sums over the
//! activation as it is (float32, not quantized), as onnxruntime runs the same graph. The
//! loader (`load::matmul_nbits`) folds the graph's four nodes for that sum into this one op.
//!
//! Why not in the kernels: the term costs one float multiply-add per block of 32 weights,
//! a thirty-second of the product, and leaving it out of the integer kernels keeps every
//! kernel path the same for Q4_0, Q4_1 and Q8_0.

use std::cell::RefCell;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::BLOCK;
use crate::engine::ops::f32_products::PanelWeights;
use crate::engine::ops::product_rewrite::WeightAxes;

/// `y + (block sums of x) · C` for block offsets `C` of `[k/32, n]` (`BlockOffsets` in
/// profiles): inputs `x [.., k]` and `y [.., n]` with the same leading axes.
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

impl PartialEq for BlockOffsets {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.offsets, &other.offsets)
    }
}
impl Eq for BlockOffsets {}

impl Op for BlockOffsets {
    fn name(&self) -> StaticName {
        "BlockOffsets".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{} × {} blocks", self.n, self.k / BLOCK)])
    }

    op_as_typed_op!();
}

impl EvalOp for BlockOffsets {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, y) = args_2!(inputs);
        let (xs, ys) = (x.shape(), y.shape());
        ensure!(
            xs.last() == Some(&self.k) && ys.last() == Some(&self.n) && xs[..xs.len() - 1] == ys[..ys.len() - 1],
            "BlockOffsets: inputs of shapes {xs:?} and {ys:?} do not fit a {} × {} weight",
            self.n,
            self.k
        );
        let rows = xs[..xs.len() - 1].iter().product();
        let mut y = y.into_tensor();
        let x_ram = x.try_as_plain_ram()?;
        self.add_to(x_ram.as_slice::<f32>()?, rows, y.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for BlockOffsets {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()), "BlockOffsets reads float32");
        ensure!(inputs[0].rank() == inputs[1].rank() && inputs[0].rank() >= 1, "BlockOffsets: x and y need the same leading axes");
        Ok(tvec!(f32::fact(inputs[1].shape.clone())))
    }

    /// The leading axes run through: x's last is its own (the inputs), y's and the output's
    /// the same one (the outputs).
    fn axes_mapping(&self, inputs: &[&TypedFact], _outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        let lead: String = ('a'..='z').take(inputs[0].rank() - 1).collect();
        AxesMapping::from_strs(&[format!("{lead}K"), format!("{lead}N")], &[format!("{lead}N")])
    }

    /// Any change of the leading axes applies to both inputs and the output alike, the op
    /// unchanged. Without this, tract's decluttering could not move a unit axis through the op,
    /// and the products around it kept shapes the engine's attention rewrite does not take:
    /// SmolLM2's decode step ran 30 attention products on tract's kernels and 90 more reshapes.
    fn change_axes(&self, model: &TypedModel, node: &TypedNode, _io: InOut, change: &AxisOp) -> TractResult<Option<AxisChangeConsequence>> {
        let rank = model.outlet_fact(node.inputs[0])?.rank();
        let leading = match change {
            AxisOp::Add(at) => *at < rank,
            AxisOp::Rm(at) => *at + 1 < rank,
            AxisOp::Move(from, to) => *from + 1 < rank && *to + 1 < rank,
            AxisOp::Reshape(at, from, _) => at + from.len() < rank,
        };
        Ok(leading.then(|| AxisChangeConsequence::new(model, node, None, change)))
    }

    as_op!();
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

    #[test]
    fn offsets_of_the_wrong_size_are_refused() {
        let err = BlockOffsets::new(&[0.0; 5], 3, 64).unwrap_err();
        assert!(err.contains("2 × 3 values, got 5"), "{err}");
    }
}
