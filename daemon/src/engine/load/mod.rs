//! Reading a model file into a runnable plan with bounded memory: the ONNX file streamed
//! ([`onnx_file`], [`matmul_nbits`]), the allocator told to give memory back while loading
//! ([`heap`]), and the graph rewritten onto the engine's ops and optimized ([`plan`]), and that graph kept for the next load ([`plan_cache`]).

pub(crate) mod heap;
pub(crate) mod matmul_nbits;
pub(crate) mod onnx_file;
pub(crate) mod plan;
pub mod plan_cache;
