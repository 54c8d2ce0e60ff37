//! The model file made into a runnable plan: the graph's declared shapes checked against the
//! manifest, tract's transformer ops detected, the engine's ops swapped in (see `ops`), then
//! optimized once. Every pass says why it is there, with what it measured.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;

use super::onnx_file;
use super::plan_cache::{self, CacheUse, PlanCache};
use crate::engine::error::LoadError;
use crate::engine::manifest::Manifest;
use crate::engine::ops::{attention, attention_products, f32_products, kv_cache, quantized, rope, softmax};

/// The optimized, runnable graph every session of a model shares.
pub type Plan = Arc<TypedRunnableModel>;

/// Reads, checks, rewrites and optimizes `dir/model.onnx` for `threads` matrix-multiply threads;
/// or, when `cache` holds this model's rewritten graph, reads that and only optimizes it.
pub(crate) fn load_plan(dir: &Path, manifest: &Manifest, threads: usize, cache: &PlanCache) -> Result<(Plan, CacheUse), LoadError> {
    let path = dir.join("model.onnx");
    if !path.is_file() {
        return Err(LoadError::MissingFile { path, problem: "is missing".into() });
    }
    // Each stage's end at debug level (`MULMD_LOG=mulmd=debug`), in ms since the file was
    // opened: where a load's time goes without a profiler (bench/RESULTS.md, load sections).
    let started = std::time::Instant::now();
    let lap = |stage: &str| tracing::debug!(stage, ms = started.elapsed().as_secs_f64() * 1e3, "load stage done");
    let bad = |e: TractError| LoadError::BadOnnx { path: path.clone(), detail: format!("{e:#}") };
    let key = cache.dir().and_then(|root| {
        plan_cache::key(dir)
            .map_err(|e| tracing::warn!(dir = %root.display(), "the plan cache is skipped: cannot identify the model ({e})"))
            .ok()
    });
    if let Some(key) = &key {
        if let Some(typed) = cache.load(key) {
            lap("cached plan read");
            // A stored graph that does not fit the manifest or fails tract's optimisation is
            // a damaged entry like one that cannot be read: the model file still can be.
            let checked = fits_manifest(&typed, manifest).map_err(|problem| anyhow::anyhow!("{problem}"));
            let optimized = checked.and_then(|_| {
                // Unwind-safe in fact: the graph is moved in and nothing of it is seen after a panic.
                let optimize = std::panic::AssertUnwindSafe(|| optimize(typed, threads));
                std::panic::catch_unwind(optimize).unwrap_or_else(|_| Err(anyhow::anyhow!("optimizing it panicked")))
            });
            match optimized {
                Ok(plan) => return Ok((plan, CacheUse::Hit)),
                Err(e) => cache.discard(key, &e),
            }
        }
    }
    let typed = rewritten(&path, manifest, &lap).map_err(|e| match e {
        Rewrite::Tract(e) => bad(e),
        Rewrite::Load(e) => e,
    })?;
    let used = match &key {
        None if cache.dir().is_none() => CacheUse::Off,
        None => CacheUse::Unstored,
        Some(key) if cache.store(key, &typed) => CacheUse::Stored,
        Some(_) => CacheUse::Unstored,
    };
    lap("plan stored");
    optimize(typed, threads).map(|plan| (plan, used)).map_err(bad)
}

/// Why the model file could not be made into a rewritten graph.
enum Rewrite {
    Tract(TractError),
    Load(LoadError),
}

impl From<TractError> for Rewrite {
    fn from(e: TractError) -> Self {
        Rewrite::Tract(e)
    }
}

/// The model file read, checked, decluttered and rewritten onto the engine's ops: what the
/// plan cache stores.
fn rewritten(path: &Path, manifest: &Manifest, lap: &dyn Fn(&str)) -> Result<TypedModel, Rewrite> {
    let path = path.to_path_buf();
    let bad = |e: TractError| Rewrite::Tract(e);
    let model = onnx_file::read_onnx(&path).map_err(bad)?;
    lap("read");
    let a = &manifest.architecture;
    let expected_inputs = 1 + 2 * a.num_layers;
    if model.inputs.len() != expected_inputs || model.outputs.len() != expected_inputs {
        return Err(Rewrite::Load(LoadError::ShapeMismatch { path, problem: io_count_problem(model.inputs.len(), model.outputs.len(), a.num_layers) }));
    }
    let typed = model.into_typed().map_err(bad)?;
    lap("typed");
    check_facts(&typed, manifest).map_err(|problem| Rewrite::Load(LoadError::ShapeMismatch { path: path.clone(), problem }))?;
    assert_lengths(&typed).map_err(bad)?;
    let mut typed = typed.into_decluttered().map_err(bad)?;
    lap("decluttered");
    // tract-transformers recognises RMSNorm, rotary embedding and attention patterns in the
    // decluttered graph and swaps in fused ops; the KV cache it folds into stateful ops is
    // unfolded again so the cache stays an explicit input/output the session owns. Measured
    // on SmolLM2-135M f32 (bench/RESULTS.md): decode 12 -> 23 tok/s, load 2.0 -> 1.4 s.
    for name in ["transformers_detect_all", "unfold_kv_cache"] {
        let transform = tract_onnx::tract_core::transform::get_transform(name)
            .map_err(bad)?
            .ok_or_else(|| Rewrite::Load(LoadError::BadOnnx { path: path.clone(), detail: format!("tract lacks the {name} transform") }))?;
        transform.transform(&mut typed).map_err(bad)?;
    }
    lap("transformers");
    give_matmuls_own_constants(&mut typed).map_err(bad)?;
    // Rotary embedding in one pass (see `rope`).
    let replaced = rope::use_rope(&mut typed).map_err(bad)?;
    tracing::debug!(replaced, "rotary embeddings on the one-pass kernel");
    // And attention's softmax, row by row (see `softmax`).
    let replaced = softmax::use_masked_softmax(&mut typed).map_err(bad)?;
    tracing::debug!(replaced, "attention softmax on the row kernel");
    // 4- and 8-bit products run on the engine's integer kernels (see `quantized`), not tract's
    // float ones (tract has none at all for 8 bits).
    let replaced = quantized::use_quantized_products(&mut typed).map_err(bad)?;
    tracing::debug!(replaced, "quantized matrix products on integer kernels");
    // So do float32 products of a constant weight (see `f32_products`).
    let replaced = f32_products::use_f32_products(&mut typed).map_err(bad)?;
    tracing::debug!(replaced, "float32 matrix products on panel kernels");
    // And attention's products of two activations (see `attention_products`).
    let replaced = attention_products::use_activation_products(&mut typed).map_err(bad)?;
    tracing::debug!(replaced, "attention products on direct kernels");
    // And those products with the softmax between them, a tile of rows at a time (see `attention`).
    let replaced = attention::use_attention(&mut typed).map_err(bad)?;
    tracing::debug!(replaced, "attention fused, a tile of query rows at a time");
    // And the KV cache grows in place rather than being copied by every pass (see `kv_cache`).
    let replaced = kv_cache::use_kv_append(&mut typed, manifest.context_length).map_err(bad)?;
    tracing::debug!(replaced, "KV cache appended in place");
    lap("rewrites");
    Ok(typed)
}

/// tract's optimisation of a rewritten graph, made runnable with `threads` matrix-multiply threads.
fn optimize(typed: TypedModel, threads: usize) -> TractResult<Plan> {
    let optimized = typed.into_optimized()?;
    tracing::debug!("plan optimized");
    let mut options = RunOptions::default();
    if threads > 1 {
        options.executor = Some(tract_linalg::multithread::Executor::multithread_with_name(threads, "mulmd-mm"));
    }
    optimized.into_runnable_with_options(&options)
}

/// Gives every matrix product that reads a shared constant a constant node of its own (the
/// same `Arc`'d tensor, no copy).
///
/// Why: tract packs a constant weight into its kernel layout once, at optimisation, only when
/// the product is the constant's sole reader. A tied output head shares the embedding table
/// with the token lookup, so without this the 12,288 × 512 table was repacked on every decode
/// step: 54% of mulm-28m's f32 step time (6.5 of 12 ms, per-op timing of a 100-step run). The
/// cost is one packed copy of the head beside the table the lookup keeps reading.
fn give_matmuls_own_constants(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::einsum::EinSum;
    use tract_onnx::tract_core::ops::konst::Const;
    let shared: Vec<(usize, Vec<InletId>)> = model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Const>() && n.outputs[0].successors.len() > 1)
        .map(|n| {
            let matmuls = n.outputs[0].successors.iter().filter(|i| model.node(i.node).op_is::<EinSum>());
            (n.id, matmuls.copied().collect())
        })
        .collect();
    for (konst, readers) in shared {
        let value = model.node(konst).op_as::<Const>().map(|c| c.val().clone()).expect("filtered on Const");
        for inlet in readers {
            let name = format!("{}.for_{}", model.node(konst).name, model.node(inlet.node).name);
            // add_node, not add_const: add_const hands back the existing node for an equal value.
            let fact = TypedFact::try_from(value.clone())?;
            let own: OutletId = model.add_node(name, Const::new(value.clone())?, tvec!(fact))?.into();
            model.add_edge(own, inlet)?;
        }
    }
    Ok(())
}

/// Tells tract what every caller guarantees about the graph's symbolic lengths: a pass feeds
/// at least one token, and a cache holds zero or more.
///
/// Why: tract replaces an element-wise op by its vectorized kernel only when it can prove the
/// op covers at least 32 elements. Without `sequence >= 1`, `576 · sequence` proves nothing,
/// so the residual adds and SwiGLU's product ran tract's generic broadcasting loop.
fn assert_lengths(model: &TypedModel) -> TractResult<()> {
    let mut assertions = Vec::new();
    if let Some(TDim::Sym(s)) = model.input_fact(0)?.shape.get(1) {
        assertions.push(format!("{s}>=1"));
    }
    for i in 1..model.inputs.len() {
        if let Some(TDim::Sym(s)) = model.input_fact(i)?.shape.get(2) {
            assertions.push(format!("{s}>=0"));
        }
    }
    assertions.sort();
    assertions.dedup();
    for a in assertions {
        model.symbols.add_assertion(a)?;
    }
    Ok(())
}

/// The graph's declared tensor shapes against the manifest's architecture.
/// A graph's inputs and outputs against a model of `layers` layers: the ids and a key and a
/// value cache per layer, the logits and the caches again.
fn io_count_problem(inputs: usize, outputs: usize, layers: usize) -> String {
    let expected = 1 + 2 * layers;
    format!("it has {inputs} inputs and {outputs} outputs, a {layers}-layer model needs {expected} of each")
}

/// Whether a stored plan has the inputs, outputs and shapes the manifest describes.
fn fits_manifest(model: &TypedModel, manifest: &Manifest) -> Result<(), String> {
    let layers = manifest.architecture.num_layers;
    if model.inputs.len() != 1 + 2 * layers || model.outputs.len() != 1 + 2 * layers {
        return Err(io_count_problem(model.inputs.len(), model.outputs.len(), layers));
    }
    check_facts(model, manifest)
}

fn check_facts(model: &TypedModel, manifest: &Manifest) -> Result<(), String> {
    let a = &manifest.architecture;
    let ids = model.input_fact(0).map_err(|e| e.to_string())?;
    if !ids.datum_type.is_integer() || ids.rank() != 2 {
        return Err(format!("input 0 should be int64 token ids [1, sequence], found {ids:?}"));
    }
    for i in 1..model.inputs.len() {
        let f = model.input_fact(i).map_err(|e| e.to_string())?;
        let dims: Vec<Option<usize>> = f.shape.iter().map(|d| d.to_usize().ok()).collect();
        if dims.len() != 4 || dims[1] != Some(a.num_kv_heads) || dims[3] != Some(a.head_dim) {
            return Err(format!(
                "KV-cache input {i} has shape {:?}, the manifest says [1, {}, past, {}]",
                f.shape, a.num_kv_heads, a.head_dim
            ));
        }
    }
    let logits = model.output_fact(0).map_err(|e| e.to_string())?;
    if logits.shape.last().and_then(|d| d.to_usize().ok()) != Some(a.vocab_size) {
        return Err(format!("logits have shape {:?}, the manifest's vocabulary is {}", logits.shape, a.vocab_size));
    }
    Ok(())
}


