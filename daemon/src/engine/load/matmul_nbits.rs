//! MatMulNBits weights turned into tract block-quant constants while the file is read, so the
//! ONNX copy of each weight is freed before the next is converted: 4 bits into tract's Q4_0,
//! 8 bits into tract's Q8_1 (Q8_0's codes and scale with an unused sum beside them).
//!
//! tract-onnx converts a 4-bit MatMulNBits weight when it makes the typed model, while the
//! inference model still holds every original: at that step the 4-bit weights were resident
//! twice, the process's peak for every q4 model. Peak RSS in `mulmd probe`, release build, on
//! top of the streaming reader and [`super::heap`]: mulm-28m q4 80 → 61 MB, SmolLM2-135M q4
//! 295 → 211 MB (139 MB of weights). tract-onnx refuses 8-bit MatMulNBits outright, so those
//! run only through here, and only on the engine's kernels: tract 0.23.9 has no CPU kernel for
//! a Q8_1 product, so an 8-bit product the rewrite in `load::plan` left to tract would fail to
//! optimize.
//!
//! [`convert`] takes the nodes whose weight fits Q4_0 or Q8_0 exactly (4 or 8 bits, blocks of
//! 32, no zero points, no bias: what `mulm-export` writes) out of the protobuf before parsing.
//! Each becomes a node of its own type whose builder wires what tract-onnx would have wired for
//! 4 bits: a cast to f32, the block-quant constant, the `…k,gnk->…n` product and a cast back.
//! The graph tract then optimizes, and the products [`crate::engine::ops::quantized`] replaces,
//! are the same. Other MatMulNBits nodes are left to tract-onnx. A weight kept in GGML's Q4_1
//! comes with four more nodes computing its block offsets' term ([`Tail`]): they are taken
//! out, and the offsets attached to the weight's constant for the product rewrite
//! (`ops::quantized::BlockOffsets`).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{ensure, Context};
use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::{attribute_proto::AttributeType, tensor_proto::DataType, GraphProto, ModelProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::internal::*;
use tract_linalg::block_quant::{BlockQuant, BlockQuantFact, BlockQuantStorage, Q4_0, Q8_1};

use crate::engine::ops::quantized::{attach_offsets, forget_offsets, BlockOffsets};

/// The op type a converted node gets; not an ONNX operator, so no file can already use it.
const OP_TYPE: &str = "mulmd.MatMulBlockQuant";

/// The weights a block holds.
const BLOCK: usize = 32;

/// A converted weight: `[N, K]`, as a Q4_0 or Q8_1 block-quant tensor of shape `[1, N, K]`.
#[derive(Clone)]
struct BlockWeight {
    n: usize,
    k: usize,
    bits: usize,
    blocks: Arc<Tensor>,
}

impl BlockWeight {
    fn format(&self) -> Box<dyn BlockQuant> {
        if self.bits == 8 { Box::new(Q8_1) } else { Box::new(Q4_0) }
    }
}

impl std::fmt::Debug for BlockWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockWeight {{ n: {}, k: {}, bits: {} }}", self.n, self.k, self.bits)
    }
}

thread_local! {
    /// Converted weights by node name, from [`convert`] to the builder. The builder is a plain
    /// `fn` (tract-onnx's `OpBuilder`) and parsing runs on the calling thread, so this is how
    /// the weights reach it. [`Converted`] empties it when dropped.
    static CONVERTED: RefCell<HashMap<String, BlockWeight>> = RefCell::new(HashMap::new());
}

/// The weights [`convert`] took out of a protobuf, waiting for parsing; dropping it discards
/// whatever parsing did not use.
pub(super) struct Converted(());

impl Drop for Converted {
    fn drop(&mut self) {
        CONVERTED.with(|c| c.borrow_mut().clear());
    }
}

/// Registers the builder for converted nodes.
pub(super) fn register(ops: &mut OnnxOpRegister) {
    ops.insert(OP_TYPE, build);
}

/// Converts every MatMulNBits node of the top-level graph that Q4_0 or Q8_0 holds exactly, freeing each
/// weight's ONNX bytes as it goes. Returns how many were converted and the guard to keep until
/// parsing has finished.
pub(super) fn convert(proto: &mut ModelProto) -> TractResult<(usize, Converted)> {
    let guard = Converted(());
    // Offsets an earlier load attached and never used must not meet this one's weights.
    forget_offsets();
    let Some(graph) = proto.graph.as_mut() else { return Ok((0, guard)) };
    let readers = reader_counts(graph);
    let mut names: HashMap<String, usize> = HashMap::new();
    for node in &graph.node {
        *names.entry(node_key(node)).or_insert(0) += 1;
    }
    let producers: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let mut converted = 0;
    let mut folded = HashSet::new();
    for index in 0..graph.node.len() {
        // The builder finds a node's weight by its name, so a name used twice stays tract's.
        if names.get(&node_key(&graph.node[index])) != Some(&1) {
            refuse_8_bits(&graph.node[index])?;
            continue;
        }
        let Some(plan) = Plan::for_node(graph, index, &readers)? else {
            refuse_8_bits(&graph.node[index])?;
            continue;
        };
        let tail = Tail::for_node(graph, index, &readers, &producers, (plan.n, plan.k));
        let weight = plan.take_and_convert(graph)?;
        if let Some(tail) = tail {
            let offsets = tail.take_offsets(graph, weight.n, weight.k)?;
            let storage = weight.blocks.storage_as::<BlockQuantStorage>().context("a block-quant weight")?;
            attach_offsets(storage.value(), offsets);
            graph.node[index].output[0] = graph.node[tail.nodes[3]].output[0].clone();
            folded.extend(tail.nodes);
        }
        let node = &mut graph.node[index];
        node.input.truncate(1);
        node.op_type = OP_TYPE.into();
        node.domain.clear();
        node.attribute.clear();
        CONVERTED.with(|c| c.borrow_mut().insert(node_key(node), weight));
        converted += 1;
    }
    // The folded tails' nodes go last, so every index above kept pointing at its node.
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !folded.contains(&(index - 1))
    });
    Ok((converted, guard))
}

/// An error for an 8-bit MatMulNBits node [`convert`] could not take: tract-onnx has none at
/// all, and its own message ("only bits=4 and bits=2") would not say what mulmd runs.
fn refuse_8_bits(node: &NodeProto) -> TractResult<()> {
    let bits = node.attribute.iter().find(|a| a.name == "bits").map(|a| a.i);
    if node.op_type == "MatMulNBits" && bits == Some(8) {
        anyhow::bail!(
            "MatMulNBits node {:?} has 8-bit weights in a form mulmd does not run: it takes them in blocks of 32, \
             without zero points, act-order indices or bias, from a node with a name of its own and weights \
             no other node reads (what `mulm-export --precision q8` writes); export the model again that way",
            node_key(node)
        );
    }
    Ok(())
}

/// The name tract-onnx gives a node, which is also its key in [`CONVERTED`].
fn node_key(node: &NodeProto) -> String {
    if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() }
}

/// How many nodes (or graph outputs) read each value.
fn reader_counts(graph: &GraphProto) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let inputs = graph.node.iter().flat_map(|n| n.input.iter());
    for name in inputs.chain(graph.output.iter().map(|o| &o.name)) {
        *counts.entry(name.clone()).or_insert(0) += 1;
    }
    counts
}

/// The four nodes mulm-export writes after a MatMulNBits whose weight keeps GGML's Q4_1
/// blocks (see `ops::quantized::BlockOffsets`): `Reshape(x, [.., -1, 32])`, `ReduceSum(…, -1)`
/// without the reduced axis, `MatMul(…, C)` with `C` the offsets `[K/32, N]`, and the `Add` of
/// that to the product. Taken out: the converted node writes the `Add`'s output, and its
/// weight carries the offsets.
struct Tail {
    /// Reshape, ReduceSum, MatMul, Add.
    nodes: [usize; 4],
    /// The name of the offsets' initializer.
    offsets: String,
}

impl Tail {
    /// `Some` when MatMulNBits node `index` (of `[N, K]` weights) is followed by exactly that
    /// shape, each intermediate value read once and the offsets an initializer only the
    /// MatMul reads.
    fn for_node(graph: &GraphProto, index: usize, readers: &HashMap<String, usize>, producers: &HashMap<String, usize>, (n, k): (usize, usize)) -> Option<Self> {
        let node = &graph.node[index];
        let once = |value: &str| readers.get(value) == Some(&1);
        let product = node.output.first().filter(|o| once(o))?;
        let add = graph.node.iter().position(|a| a.op_type == "Add" && a.input.contains(product))?;
        let add_node = &graph.node[add];
        if add_node.input.len() != 2 || add_node.output.len() != 1 {
            return None;
        }
        let term = add_node.input.iter().find(|i| *i != product).filter(|t| once(t))?;
        let matmul = *producers.get(term)?;
        let matmul_node = &graph.node[matmul];
        let [sums, offsets] = matmul_node.input.as_slice() else { return None };
        if matmul_node.op_type != "MatMul" || !once(sums) || !once(offsets) {
            return None;
        }
        let c = graph.initializer.iter().find(|t| &t.name == offsets)?;
        let blocks = k / BLOCK;
        if c.data_type != DataType::Float as i32 || c.dims != [blocks as i64, n as i64] || c.raw_data.len() != blocks * n * 4 {
            return None;
        }
        let reduce = *producers.get(sums)?;
        let reduce_node = &graph.node[reduce];
        let keepdims = reduce_node.attribute.iter().find(|a| a.name == "keepdims").map_or(1, |a| a.i);
        let [blocked, axes] = reduce_node.input.as_slice() else { return None };
        if reduce_node.op_type != "ReduceSum" || keepdims != 0 || ints(graph, axes)? != [-1] || !once(blocked) {
            return None;
        }
        let reshape = *producers.get(blocked)?;
        let reshape_node = &graph.node[reshape];
        let [x, shape] = reshape_node.input.as_slice() else { return None };
        // Every axis kept (0) but the last, cut into blocks of 32.
        let shape = ints(graph, shape)?;
        let cut = matches!(shape.as_slice(), [lead @ .., count, 32] if lead.iter().all(|&d| d == 0) && (*count == -1 || *count == blocks as i64));
        if reshape_node.op_type != "Reshape" || x != &node.input[0] || !cut {
            return None;
        }
        Some(Tail { nodes: [reshape, reduce, matmul, add], offsets: offsets.clone() })
    }

    /// Removes the offsets' initializer (`[K/32, N]`) from the graph, as what adds their term.
    fn take_offsets(&self, graph: &mut GraphProto, n: usize, k: usize) -> TractResult<BlockOffsets> {
        let at = graph.initializer.iter().position(|t| t.name == self.offsets).context("the offsets' initializer")?;
        let c = graph.initializer.swap_remove(at);
        let offsets: Vec<f32> = c.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        BlockOffsets::new(&offsets, n, k).map_err(|e| anyhow::anyhow!(e))
    }
}

/// The values of an int64 initializer, if `name` is one.
fn ints(graph: &GraphProto, name: &str) -> Option<Vec<i64>> {
    let t = graph.initializer.iter().find(|t| t.name == name && t.data_type == DataType::Int64 as i32)?;
    if !t.int64_data.is_empty() {
        return Some(t.int64_data.clone());
    }
    Some(t.raw_data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect())
}

/// A node found convertible: its shape, code width and the initializers holding its codes
/// and scales.
struct Plan {
    n: usize,
    k: usize,
    bits: usize,
    codes: usize,
    scales: usize,
}

impl Plan {
    /// `Some` when node `index` is a MatMulNBits whose weight Q4_0 or Q8_0 holds exactly and whose
    /// codes and scales are initializers only it reads.
    fn for_node(graph: &GraphProto, index: usize, readers: &HashMap<String, usize>) -> TractResult<Option<Self>> {
        let node = &graph.node[index];
        if node.op_type != "MatMulNBits" || node.domain != "com.microsoft" {
            return Ok(None);
        }
        let int = |name: &str| {
            node.attribute.iter().find(|a| a.name == name && a.r#type == AttributeType::Int as i32).map(|a| a.i)
        };
        let (Some(k), Some(n), Some(block_size)) = (int("K"), int("N"), int("block_size")) else { return Ok(None) };
        let bits = int("bits").unwrap_or(4);
        // Zero points, act-order indices and a bias are inputs 3 to 5; any of them is tract's.
        let extra_inputs = node.input.iter().skip(3).any(|i| !i.is_empty());
        if !(bits == 4 || bits == 8) || block_size != BLOCK as i64 || k <= 0 || n <= 0 || k % BLOCK as i64 != 0 || extra_inputs {
            return Ok(None);
        }
        let (n, k, bits) = (n as usize, k as usize, bits as usize);
        if node.input.len() < 3 || node.output.len() != 1 || node_key(node).is_empty() {
            return Ok(None);
        }
        let only_reader = |name: &str| readers.get(name) == Some(&1);
        let find = |name: &str| graph.initializer.iter().position(|t| t.name == name && only_reader(name));
        let (Some(codes), Some(scales)) = (find(&node.input[1]), find(&node.input[2])) else { return Ok(None) };
        let (c, s) = (&graph.initializer[codes], &graph.initializer[scales]);
        // Sizes from the file: a product that overflows is no weight this process could hold.
        let Some(blocks) = n.checked_mul(k).map(|nk| nk / BLOCK) else { return Ok(None) };
        let scale_bytes = match DataType::try_from(s.data_type) {
            Ok(DataType::Float) => 4,
            Ok(DataType::Float16) => 2,
            _ => return Ok(None),
        };
        let code_bytes = BLOCK * bits / 8;
        if c.data_type != DataType::Uint8 as i32 || c.raw_data.len() != blocks * code_bytes || s.raw_data.len() != blocks * scale_bytes {
            return Ok(None);
        }
        Ok(Some(Plan { n, k, bits, codes, scales }))
    }

    /// Removes the two initializers from the graph and packs them as Q4_0 or Q8_1.
    fn take_and_convert(self, graph: &mut GraphProto) -> TractResult<BlockWeight> {
        // Remove the later index first so the earlier one still points at its tensor.
        let (first, second) = if self.codes > self.scales { (self.codes, self.scales) } else { (self.scales, self.codes) };
        let a = graph.initializer.swap_remove(first);
        let b = graph.initializer.swap_remove(second);
        let (codes, scales) = if self.codes > self.scales { (a, b) } else { (b, a) };
        let scales: Vec<f32> = if scales.data_type == DataType::Float as i32 {
            scales.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        } else {
            scales.raw_data.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect()
        };
        let packed = if self.bits == 8 {
            q8_1_blocks(&codes.raw_data, &scales)
        } else {
            q4_0_blocks(&codes.raw_data, &scales).with_context(|| format!("packing {} as Q4_0", codes.name))?
        };
        let weight = BlockWeight { n: self.n, k: self.k, bits: self.bits, blocks: Arc::new(Tensor::default()) };
        let storage = BlockQuantStorage::new(weight.format(), self.n, self.k, Arc::new(packed))?;
        let blocks = Arc::new(storage.into_tensor_with_shape(f32::datum_type(), &[1, self.n, self.k]));
        Ok(BlockWeight { blocks, ..weight })
    }
}

/// MatMulNBits' 4-bit codes and per-block scales as tract's Q4_0 blocks: float16 scale, then
/// 16 bytes, byte `j` holding weight `j` in its low nibble and weight `16 + j` in its high one.
///
/// MatMulNBits stores row by row, block by block, byte `i` holding weights `2i` (low nibble)
/// and `2i + 1`; a block is the same 16 bytes in another order, so rows need no bookkeeping.
/// Why not tract's `pack_prequantized_nibbles`, which gives the same bytes (tested): it writes
/// one nibble at a time through a generic writer, 180 ms of SmolLM2 q4's 1.3 s load; this
/// loop takes a few.
fn q4_0_blocks(codes: &[u8], scales: &[f32]) -> TractResult<tract_onnx::tract_core::internal::Blob> {
    const HALF: usize = BLOCK / 2;
    const OUT: usize = 2 + HALF;
    ensure!(codes.len() == scales.len() * HALF, "{} code bytes for {} blocks of {BLOCK}", codes.len(), scales.len());
    let layout = std::alloc::Layout::from_size_align(scales.len() * OUT, 128)?;
    // SAFETY: every byte of the blob is written below: 2 + 16 per block, blocks tiling it.
    let mut blob = unsafe { tract_onnx::tract_core::internal::Blob::for_layout(layout) };
    for ((out, src), &scale) in blob.chunks_exact_mut(OUT).zip(codes.chunks_exact(HALF)).zip(scales) {
        out[..2].copy_from_slice(&f16::from_f32(scale).to_bits().to_le_bytes());
        let weight = |i: usize| (src[i / 2] >> (4 * (i % 2))) & 0x0F;
        for (j, byte) in out[2..].iter_mut().enumerate() {
            *byte = weight(j) | weight(j + HALF) << 4;
        }
    }
    Ok(blob)
}

/// MatMulNBits' 8-bit codes (`q + 128`, row by row, block by block) and per-block scales as
/// tract's Q8_1 blocks: float16 scale, float16 sum of the block's weights (tract's kernels do
/// not read it), then the 32 signed `q`.
fn q8_1_blocks(codes: &[u8], scales: &[f32]) -> tract_onnx::tract_core::internal::Blob {
    let mut out = Vec::with_capacity(scales.len() * (4 + BLOCK));
    // Flipping a code's top bit makes it the signed q (q + 128 → q).
    let signed = |c: u8| (c ^ 0x80) as i8;
    for (block, &scale) in codes.chunks_exact(BLOCK).zip(scales) {
        let sum: i32 = block.iter().map(|&c| signed(c) as i32).sum();
        out.extend_from_slice(&f16::from_f32(scale).to_bits().to_le_bytes());
        out.extend_from_slice(&f16::from_f32(scale * sum as f32).to_bits().to_le_bytes());
        out.extend(block.iter().map(|&c| signed(c) as u8));
    }
    tract_onnx::tract_core::internal::Blob::from_bytes(&out).expect("a byte buffer")
}

/// tract-onnx's builder for [`OP_TYPE`] nodes.
fn build(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let key = node_key(node);
    let weight = CONVERTED.with(|c| c.borrow_mut().remove(&key));
    let weight = weight.with_context(|| format!("no converted weight for {key}: {OP_TYPE} nodes come only from mulmd's loader"))?;
    Ok((expand(MatMulBlockQuant { weight }), vec![]))
}

/// `Y = A · Wᵀ` for a block-quantized weight `W` of `[N, K]`, `A` of `[.., K]`.
#[derive(Debug, Clone)]
struct MatMulBlockQuant {
    weight: BlockWeight,
}

impl Expansion for MatMulBlockQuant {
    fn name(&self) -> StaticName {
        "MatMulBlockQuant".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)?;
        let (n, k) = (self.weight.n.to_dim(), self.weight.k.to_dim());
        s.given(&inputs[0].rank, move |s, rank| {
            let last = rank as usize - 1;
            for axis in 0..last {
                s.equals(&outputs[0].shape[axis], &inputs[0].shape[axis])?;
            }
            s.equals(&inputs[0].shape[last], k.clone())?;
            s.equals(&outputs[0].shape[last], n.clone())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        ensure!((1..=9).contains(&fact.rank()), "{prefix}: a quantized product takes an input of 1 to 9 axes, not {}", fact.rank());
        let (n, k) = (self.weight.n, self.weight.k);
        let a = model.wire_node(format!("{prefix}.cast_a"), cast(f32::datum_type()), &[inputs[0]])?[0];
        let bq_fact = BlockQuantFact::new(self.weight.format(), tvec!(1, n, k));
        let konst = Const::new_with_exotic_fact(self.weight.blocks.clone(), Box::new(bq_fact))?;
        let w = model.wire_node(format!("{prefix}.weight_bq"), konst, &[])?[0];
        let lead: String = "abcdefgh".chars().take(fact.rank() - 1).collect();
        let axes = AxesMapping::from_strs(&[format!("{lead}k"), "gnk".to_string()], &[format!("{lead}n")])?;
        let y = model.wire_node(format!("{prefix}.matmul"), EinSum::new(axes, f32::datum_type()), &[a, w])?[0];
        model.wire_node(format!("{prefix}.cast_y"), cast(fact.datum_type), &[y])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written packing gives tract's own bytes, for every nibble value in both halves
    /// of a block and scales that float16 rounds.
    #[test]
    fn q4_0_blocks_match_tracts_packing() {
        let (n, k) = (3, 4 * BLOCK);
        let codes: Vec<u8> = (0..n * k / 2).map(|i| (i * 37 + 11) as u8).collect();
        let scales: Vec<f32> = (0..n * k / BLOCK).map(|i| 0.013 * (i as f32 - 5.3)).collect();
        let ours = q4_0_blocks(&codes, &scales).unwrap();
        let tracts = Q4_0.pack_prequantized_nibbles(&codes, &scales, n, k).unwrap();
        assert_eq!(&ours[..], &tracts[..]);
    }

    #[test]
    fn q4_0_blocks_refuse_codes_that_do_not_fill_the_blocks() {
        let err = q4_0_blocks(&[0; 15], &[1.0]).unwrap_err();
        assert!(err.to_string().contains("15 code bytes for 1 blocks"), "{err}");
    }
}
