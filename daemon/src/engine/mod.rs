//! The only place that touches tract and tokenizers: model loading, per-request KV caches,
//! sampling, word boundaries and the worker threads. The rest of mulmd holds an [`Engine`] and
//! receives [`OpenerEvent`]s.

mod aligned;
mod attention_products;
mod error;
mod f32_products;
mod heap;
mod manifest;
mod matmul_nbits;
mod model;
mod onnx_file;
mod op_swap;
mod opener;
mod prefix;
mod profile;
mod probe;
mod product_rewrite;
mod rope;
mod sampling;
mod session;
mod shares;
mod softmax;
mod team;
mod template;
mod w4a8;
mod words;
mod worker;

pub use error::{LoadError, RequestError};
pub use manifest::Manifest;
pub use model::Model;
pub use opener::{write_opener, CancelToken, Opener, OpenerEvent, OpenerOptions, OpenerTimings, WordEvent};
pub use probe::{probe, ProbeOptions, ProbeRun, RunProfile};
pub use profile::{OpProfile, OpTime};
pub use sampling::Sampling;
pub use session::Session;
pub use words::StopReason;
pub use worker::{Engine, EngineConfig, EventSink, Job};
