//! Why decode is fast: the engine's own ops and kernels, swapped into tract's optimized graph
//! at load (see `load::plan`). Each op states its contract in its module doc and is checked
//! against the tract op it replaces (or onnxruntime) in its tests.
//!
//! - [`quantized`]: 4- and 8-bit weights × 8-bit activations on integer dot products
//!   (AVX-512 VNNI, AVX-VNNI, AVX2, `sdot`, NEON), chosen at run time.
//! - [`f32_products`]: float32 weights streamed in 16-output panels.
//! - [`attention_products`]: attention's products of two activations; [`attention`]: those
//!   and the softmax between them, a tile of query rows at a time.
//! - [`kv_cache`]: the KV cache appended to in place, with room for more positions.
//! - [`rope`], [`softmax`]: rotary embedding and attention's masked softmax in one pass.
//! - [`product_rewrite`], [`op_swap`]: how the above replace tract's ops in a graph.
//! - [`shares`], [`team`], [`aligned`]: splitting a product over threads, the helper team,
//!   cache-aligned buffers.
//! - [`stored`], [`nnef`]: laid-out weights as bytes and the engine's ops in NNEF, for the plan
//!   cache (`load::plan_cache`).
//! - [`isa`]: which instruction sets the kernels may use (all the CPU has, or a forced level).

pub(crate) mod aligned;
pub(crate) mod attention;
pub(crate) mod attention_products;
pub(crate) mod f32_products;
pub mod isa;
pub(crate) mod kv_cache;
pub(crate) mod nnef;
pub(crate) mod op_swap;
pub(crate) mod product_rewrite;
pub(crate) mod quantized;
pub(crate) mod rope;
pub(crate) mod shares;
pub(crate) mod softmax;
pub(crate) mod stored;
pub(crate) mod team;
