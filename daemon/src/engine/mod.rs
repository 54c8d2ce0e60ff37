//! The only place that touches tract and tokenizers: model loading, per-request KV caches,
//! sampling, word boundaries and the worker threads. The rest of mulmd holds an [`Engine`],
//! submits a [`Prompt`] with a cancellation token, and reads [`OpenerEvents`].

// The serving path, top down: worker → opener → session → model, with sampling, words,
// template and prefix beside them.
mod worker;
mod queue;
mod opener;
mod prompt;
mod session;
mod model;
mod forward;
mod sampling;
mod words;
mod template;
mod prefix;
mod prefix_cache;
mod manifest;
mod error;
mod probe;
mod profile;
// Loading a model file into a plan, and the ops that make the plan fast.
mod load;
mod ops;

/// The engine kernels' instruction-set level (`MULMD_KERNELS`): for reports and checks.
pub use ops::isa as kernels;
pub use error::{LoadError, RequestError};
pub use manifest::Manifest;
pub use load::plan_cache::default_dir as plan_cache_dir;
pub use model::{CacheUse, Model, PlanCache};
pub use opener::{write_opener, Opener, OpenerEvent, OpenerOptions, OpenerTimings, WordEvent};
pub use prompt::{Prompt, Speaker, Turn};
pub use prefix_cache::PrefixCache;
pub use probe::{probe, ProbeOptions, ProbeRun, RunProfile};
pub use profile::{OpProfile, OpTime};
pub use sampling::Sampling;
pub use session::Session;
pub use words::{ends_sentence, StopReason};
pub use worker::{Engine, EngineConfig, OpenerEvents};
