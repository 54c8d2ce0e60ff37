//! The engine's ops in NNEF, so that a rewritten graph can be written once and read back at
//! the next start (the plan cache, `load::plan_cache`).
//!
//! Each op is an invocation `mulmd_<op>([inputs…], attributes…)`. A weight product names its
//! weight by key in a [`WeightStore`]: a file of [`stored`](super::stored) records beside the
//! graph, read straight into the kernels' layout. Through NNEF's own tensor files every weight
//! would be read whole, then copied into its layout while the graph still held the read one.
//! Floats travel as their bits, so a read-back op computes exactly what the written one did.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use memmap2::Mmap;

use tract_nnef::internal::*;
use tract_nnef::ser::array;

use super::attention::Attention;
use super::attention_products::ActivationProduct;
use super::f32_products::PanelWeights;
use super::kv_cache::KvAppend;
use super::product_rewrite::{WeightMatrix, WeightProduct};
use super::quantized::Weights;
use super::rope::Rope;
use super::softmax::MaskedSoftmax;
use super::stored::{RecordReader, RecordWriter, StoredWeights};

/// The resource a graph's weight products find their [`WeightStore`] under.
pub const WEIGHTS: &str = "mulmd_weights";

/// The `mulmd` NNEF registry: a dumper and a loader for every op the engine puts in a graph.
pub fn registry() -> Registry {
    let mut registry = Registry::new("mulmd").with_doc("mulmd's engine ops, for its plan cache");
    registry.register_dumper(dump_product::<Weights>);
    registry.register_dumper(dump_product::<PanelWeights>);
    registry.register_dumper(dump_activation_product);
    registry.register_dumper(dump_softmax);
    registry.register_dumper(dump_attention);
    registry.register_dumper(dump_rope);
    registry.register_dumper(dump_kv_append);
    let inputs = || TypeName::Scalar.tensor().array().named("inputs");
    let output = [("output", TypeName::Scalar.tensor())];
    let product = [inputs(), TypeName::String.named("weights"), TypeName::Integer.named("lead")];
    registry.register_primitive(&product_id::<Weights>(), &product, &output, load_product::<Weights>);
    registry.register_primitive(&product_id::<PanelWeights>(), &product, &output, load_product::<PanelWeights>);
    let axes = TypeName::Integer.array();
    registry.register_primitive(
        "mulmd_activation_product",
        &[inputs(), axes.clone().named("axes")],
        &output,
        load_activation_product,
    );
    let softmax = [TypeName::Integer.named("scale_bits"), TypeName::Logical.named("post_softmax_mask")];
    let mut with_inputs = vec![inputs()];
    with_inputs.extend(softmax.iter().cloned());
    registry.register_primitive("mulmd_masked_softmax", &with_inputs, &output, load_softmax);
    with_inputs.extend([axes.clone().named("scores"), axes.named("mix")]);
    registry.register_primitive("mulmd_attention", &with_inputs, &output, load_attention);
    registry.register_primitive("mulmd_rope", &[inputs()], &output, load_rope);
    registry.register_primitive("mulmd_kv_append", &[inputs(), TypeName::Integer.named("limit")], &output, load_kv_append);
    registry
}

fn product_id<W: WeightMatrix>() -> String {
    format!("mulmd_{}", W::OP_NAME.to_lowercase())
}

/// The node's inputs as one array argument.
fn inputs_of(ast: &IntoAst, node: &TypedNode) -> Arc<RValue> {
    Arc::new(array(node.inputs.iter().map(|i| (*ast.mapping[i]).clone()).collect::<Vec<_>>()))
}

fn ints(values: &[usize]) -> RValue {
    array(values.iter().map(|v| numeric(*v)).collect::<Vec<_>>())
}

/// The `inputs` argument, refused unless it has `count` tensors.
fn wired_inputs(builder: &mut ModelBuilder, invocation: &ResolvedInvocation, count: usize) -> TractResult<TVec<OutletId>> {
    let inputs: TVec<OutletId> = invocation.named_arg_as(builder, "inputs")?;
    ensure!(inputs.len() == count, "{} takes {count} inputs, the graph gives {}", invocation.invocation.id.0, inputs.len());
    Ok(inputs)
}

fn dump_product<W: WeightMatrix + StoredWeights>(
    ast: &mut IntoAst,
    node: &TypedNode,
    op: &WeightProduct<W>,
) -> TractResult<Option<Arc<RValue>>> {
    let named = [("weights", string(&node.name)), ("lead", numeric(op.lead))];
    Ok(Some(invocation(product_id::<W>(), &[inputs_of(ast, node)], &named)))
}

fn load_product<W: WeightMatrix + StoredWeights>(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let inputs = wired_inputs(builder, invocation, 1)?;
    let key: String = invocation.named_arg_as(builder, "weights")?;
    let lead: usize = invocation.named_arg_as(builder, "lead")?;
    let store = builder
        .proto_model
        .resources
        .get(WEIGHTS)
        .and_then(|r| r.clone().downcast_arc::<WeightStore>().ok())
        .context("the graph names stored weights, and no weight store came with it")?;
    let weights = store.weights::<W>(&key)?;
    builder.wire(WeightProduct { weights, lead }, &inputs)
}

fn dump_activation_product(ast: &mut IntoAst, node: &TypedNode, op: &ActivationProduct) -> TractResult<Option<Arc<RValue>>> {
    Ok(Some(invocation("mulmd_activation_product", &[inputs_of(ast, node)], &[("axes", ints(&op.axes()))])))
}

fn load_activation_product(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let inputs = wired_inputs(builder, invocation, 2)?;
    let ranks = (Some(rank(builder, inputs[0])?), rank(builder, inputs[1])?);
    let op = product_from(builder, invocation, "axes", ranks)?;
    builder.wire(op, &inputs)
}

fn rank(builder: &ModelBuilder, outlet: OutletId) -> TractResult<usize> {
    Ok(builder.model.outlet_fact(outlet)?.rank())
}

/// An [`ActivationProduct`] from an axes argument, checked against its two operands' ranks
/// (`None` for a first operand read in order: as many as its axes).
fn product_from(
    builder: &mut ModelBuilder,
    invocation: &ResolvedInvocation,
    name: &str,
    ranks: (Option<usize>, usize),
) -> TractResult<ActivationProduct> {
    let axes: TVec<usize> = invocation.named_arg_as(builder, name)?;
    let first = ranks.0.unwrap_or(axes.len().saturating_sub(3));
    ActivationProduct::from_axes(&axes, (first, ranks.1)).with_context(|| format!("{name} = {axes:?}"))
}

fn softmax_attributes(op: &MaskedSoftmax) -> [(&'static str, RValue); 2] {
    let (scale, post_softmax_mask) = op.attributes();
    [("scale_bits", numeric(scale.to_bits())), ("post_softmax_mask", logical(post_softmax_mask))]
}

fn softmax_from(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<MaskedSoftmax> {
    let bits: i64 = invocation.named_arg_as(builder, "scale_bits")?;
    let bits = u32::try_from(bits).context("a float's bits")?;
    MaskedSoftmax::new(f32::from_bits(bits), invocation.named_arg_as(builder, "post_softmax_mask")?)
}

fn dump_softmax(ast: &mut IntoAst, node: &TypedNode, op: &MaskedSoftmax) -> TractResult<Option<Arc<RValue>>> {
    Ok(Some(invocation("mulmd_masked_softmax", &[inputs_of(ast, node)], &softmax_attributes(op))))
}

fn load_softmax(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let inputs = wired_inputs(builder, invocation, 2)?;
    let op = softmax_from(builder, invocation)?;
    builder.wire(op, &inputs)
}

fn dump_attention(ast: &mut IntoAst, node: &TypedNode, op: &Attention) -> TractResult<Option<Arc<RValue>>> {
    let (scores, softmax, mix) = op.parts();
    let mut named = softmax_attributes(softmax).to_vec();
    named.extend([("scores", ints(&scores.axes())), ("mix", ints(&mix.axes()))]);
    Ok(Some(invocation("mulmd_attention", &[inputs_of(ast, node)], &named)))
}

fn load_attention(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    // Queries, keys, the mask, values: the scores multiply the first two, the mix the
    // probabilities (the scores' output, read in order) and the values.
    let inputs = wired_inputs(builder, invocation, 4)?;
    let scores = product_from(builder, invocation, "scores", (Some(rank(builder, inputs[0])?), rank(builder, inputs[1])?))?;
    let mix = product_from(builder, invocation, "mix", (None, rank(builder, inputs[3])?))?;
    let op = Attention::from_parts(scores, softmax_from(builder, invocation)?, mix)?;
    builder.wire(op, &inputs)
}

fn dump_rope(ast: &mut IntoAst, node: &TypedNode, _op: &Rope) -> TractResult<Option<Arc<RValue>>> {
    Ok(Some(invocation("mulmd_rope", &[inputs_of(ast, node)], &[])))
}

fn load_rope(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let inputs = wired_inputs(builder, invocation, 3)?;
    builder.wire(Rope, &inputs)
}

fn dump_kv_append(ast: &mut IntoAst, node: &TypedNode, op: &KvAppend) -> TractResult<Option<Arc<RValue>>> {
    Ok(Some(invocation("mulmd_kv_append", &[inputs_of(ast, node)], &[("limit", numeric(op.limit))])))
}

fn load_kv_append(builder: &mut ModelBuilder, invocation: &ResolvedInvocation) -> TractResult<Value> {
    let inputs = wired_inputs(builder, invocation, 2)?;
    let limit: usize = invocation.named_arg_as(builder, "limit")?;
    builder.wire(KvAppend { limit }, &inputs)
}

/// Where each stored weight's record lies in the weights file, by the key its node names.
pub type WeightIndex = HashMap<String, (u64, u64)>;

/// Writes the weight of every weight product in `model` to `out` and returns the index the
/// graph's keys (node names) find them by. A weight two products share is written once.
pub fn write_weights(model: &TypedModel, out: &mut impl std::io::Write) -> TractResult<WeightIndex> {
    let mut out = RecordWriter::new(out);
    let mut index = WeightIndex::new();
    let mut written: HashMap<usize, (u64, u64)> = HashMap::new();
    for node in model.nodes() {
        let record = if let Some(op) = node.op_as::<WeightProduct<Weights>>() {
            write_once(&mut out, &mut written, &op.weights)?
        } else if let Some(op) = node.op_as::<WeightProduct<PanelWeights>>() {
            write_once(&mut out, &mut written, &op.weights)?
        } else {
            continue;
        };
        index.insert(node.name.clone(), record);
    }
    Ok(index)
}

fn write_once<W: StoredWeights, O: std::io::Write>(
    out: &mut RecordWriter<O>,
    written: &mut HashMap<usize, (u64, u64)>,
    weights: &Arc<W>,
) -> TractResult<(u64, u64)> {
    let id = Arc::as_ptr(weights) as usize;
    if let Some(record) = written.get(&id) {
        return Ok(*record);
    }
    let at = out.position();
    out.u64(W::TAG)?;
    weights.store(out)?;
    let record = (at, out.position() - at);
    written.insert(id, record);
    Ok(record)
}

/// The weights file of a stored graph, read record by record as its products are wired.
/// Products that shared a weight when written share it again.
///
/// The file is mapped, and the weights' arrays stay its pages. mulmd never changes an entry's
/// file once written (entries are written whole under another name and renamed; eviction
/// unlinks, which leaves a mapping intact), so the map holds what was written.
#[derive(Debug)]
pub struct WeightStore {
    map: Arc<Mmap>,
    index: WeightIndex,
    read: Mutex<HashMap<u64, Arc<dyn std::any::Any + Send + Sync>>>,
}

impl Resource for WeightStore {}

impl WeightStore {
    pub fn open(path: &Path, index: WeightIndex) -> TractResult<Self> {
        ensure!(std::fs::symlink_metadata(path)?.is_file(), "{} is not a regular file", path.display());
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is a plan-cache entry's, which no one writes once it is in place
        // (see the type's doc); a mapping of a file truncated behind mulmd's back would fault,
        // as a mapped model file does in llama.cpp (the README warns against it).
        let map = Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?);
        let len = map.len() as u64;
        if let Some((key, (at, size))) = index.iter().find(|(_, (at, size))| at.checked_add(*size).is_none_or(|end| end > len)) {
            bail!("the weight {key:?} lies at {at}+{size}, past the end of {} ({len} bytes)", path.display());
        }
        Ok(Self { map, index, read: Mutex::new(HashMap::new()) })
    }

    /// The weight stored under `key`, read on first use.
    fn weights<W: StoredWeights + Send + Sync + 'static>(&self, key: &str) -> TractResult<Arc<W>> {
        let &(at, len) = self.index.get(key).with_context(|| format!("no weight is stored under {key:?}"))?;
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = read.get(&at) {
            return done.clone().downcast::<W>().map_err(|_| format_err!("the weight at {at} was read as another kind"));
        }
        let mut from = RecordReader::new(&self.map, at, len);
        let tag = from.u64("a record's kind").map_err(|e| format_err!("{e}"))?;
        ensure!(tag == W::TAG, "the record for {key:?} holds another kind of weight");
        let weights = W::restore(&mut from).and_then(|w| from.finish("a weight").map(|_| w));
        let weights = Arc::new(weights.map_err(|e| format_err!("the weight stored for {key:?}: {e}"))?);
        read.insert(at, weights.clone());
        Ok(weights)
    }
}

