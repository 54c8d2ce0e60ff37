//! A loaded model directory: the optimized tract plan, the tokenizer and the chat template.
//! Loaded once and shared read-only by every worker; per-request state lives in `Session`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tract_onnx::prelude::*;

use super::error::{LoadError, RequestError};
use super::forward::{empty_cache, feed};
use super::load::heap::LoadingHeap;
use super::load::plan::{load_plan, Plan};
pub use super::load::plan_cache::{CacheUse, PlanCache};
use super::manifest::Manifest;
use super::prompt::{Prompt, Turn};
use super::prefix::{self, Prefix};
use super::template::{ChatTemplate, Message};

pub struct Model {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub(crate) plan: Plan,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: ChatTemplate,
    /// Token ids that end generation: the manifest's stop tokens and every special token.
    pub(crate) stop_ids: HashSet<u32>,
    pub(crate) bos_id: Option<u32>,
    /// The default chat template's head, prefilled at load (see `prefix`).
    pub(crate) prefix: Prefix,
    pub load_time: Duration,
    /// Whether the plan came from the plan cache, or was made and stored there.
    pub plan_cache: CacheUse,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("dir", &self.dir).field("name", &self.manifest.name).finish()
    }
}

impl Model {
    /// Loads and checks a model directory. `threads` sets tract's matrix-multiply threads.
    /// The plan cache is `$MULMD_PLAN_CACHE`'s or the default one (see [`PlanCache::from_env`]).
    pub fn load(dir: &Path, threads: usize) -> Result<Self, LoadError> {
        Self::load_with_cache(dir, threads, &PlanCache::from_env())
    }

    /// [`Model::load`] with the plan kept in, and read from, `cache`.
    pub fn load_with_cache(dir: &Path, threads: usize, cache: &PlanCache) -> Result<Self, LoadError> {
        let started = Instant::now();
        // A forced kernel level this CPU lacks must stop the load, not fall back unseen.
        crate::engine::ops::isa::configured().map_err(LoadError::Kernels)?;
        let heap = LoadingHeap::begin();
        if !dir.is_dir() {
            return Err(LoadError::MissingFile {
                path: dir.to_path_buf(),
                problem: "is not a directory".into(),
            });
        }
        let manifest = Manifest::read(dir)?;
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(LoadError::MissingFile { path: tokenizer_path, problem: "is missing".into() });
        }
        // The tokenizer parses on a thread of its own while the plan loads: SmolLM2's takes
        // 80 ms, a quarter of a load from the plan cache (bench/RESULTS.md, plan cache).
        let (tokenizer, plan) = std::thread::scope(|scope| {
            let tokenizer = std::thread::Builder::new()
                .name("mulmd-tokenizer".into())
                .spawn_scoped(scope, || {
                    let read = load_tokenizer(dir, &manifest);
                    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "tokenizer read");
                    read
                });
            let plan = load_plan(dir, &manifest, threads, cache);
            tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "plan made");
            let tokenizer = match tokenizer {
                Ok(thread) => thread.join().unwrap_or_else(|_| Err(LoadError::BadTokenizer { path: tokenizer_path.clone(), detail: "its parser panicked".into() })),
                // No thread to be had: parse it here.
                Err(_) => load_tokenizer(dir, &manifest),
            };
            (tokenizer, plan)
        });
        // A tokenizer's problem first, as before the two ran side by side.
        let tokenizer = tokenizer?;
        let (plan, plan_cache) = plan?;
        let manifest_path = dir.join(super::manifest::FILE);
        let template = ChatTemplate::new(
            &manifest.chat_template,
            manifest.special_tokens.bos.as_deref(),
            &manifest.special_tokens.eos,
        )
        .map_err(|e| LoadError::BadTemplate { path: manifest_path.clone(), detail: e.to_string() })?;

        let id = |t: &str| tokenizer.token_to_id(t);
        let mut stop_ids: HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        for t in manifest.special_tokens.stop.iter().chain([&manifest.special_tokens.eos]) {
            let i = id(t).ok_or_else(|| LoadError::VocabularyMismatch {
                path: dir.join("tokenizer.json"),
                problem: format!("the stop token {t:?} named in mulm.json is not in the vocabulary"),
            })?;
            stop_ids.insert(i);
        }
        let bos_id = match &manifest.special_tokens.bos {
            Some(b) if manifest.special_tokens.add_bos => Some(id(b).ok_or_else(|| LoadError::VocabularyMismatch {
                path: dir.join("tokenizer.json"),
                problem: format!("the bos token {b:?} named in mulm.json is not in the vocabulary"),
            })?),
            _ => None,
        };
        let mut model = Self {
            dir: dir.to_path_buf(),
            manifest,
            plan,
            tokenizer,
            template,
            stop_ids,
            bos_id,
            prefix: Prefix::default(),
            load_time: Duration::ZERO,
            plan_cache,
        };
        model.prefix = match model.prefill_head(&manifest_path, &dir.join("model.onnx")) {
            Ok(prefix) => prefix,
            // A plan from the cache that cannot run the template head is a damaged entry: the
            // model file may still load. (Loaded from the file, the error is the file's.)
            Err(e) if model.plan_cache == CacheUse::Hit => {
                cache.discard_for(dir, &anyhow::anyhow!("running the chat template's head: {e}"));
                drop((model, heap));
                return Self::load_with_cache(dir, threads, cache);
            }
            Err(e) => return Err(e),
        };
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "template head prefilled");
        drop(heap);
        model.load_time = started.elapsed();
        Ok(model)
    }

    /// Runs the default template's head through the model once, for every session to start
    /// from. A template whose renderings share no tokens gives an empty prefix. A template
    /// that cannot render a plain question is the manifest's fault, a failing pass the graph's.
    fn prefill_head(&self, manifest_path: &Path, onnx_path: &Path) -> Result<Prefix, LoadError> {
        let ids = prefix::head_ids(|q| self.prompt_ids(None, q)).map_err(|detail| LoadError::BadTemplate {
            path: manifest_path.to_path_buf(),
            detail: format!("rendering a single question: {detail}"),
        })?;
        if ids.is_empty() || ids.len() + 1 >= self.context_length() {
            return Ok(Prefix::default());
        }
        let err = |e: TractError| LoadError::BadOnnx {
            path: onnx_path.to_path_buf(),
            detail: format!("running the chat template's head through the model: {e:#}"),
        };
        let past = empty_cache(&self.manifest.architecture).map_err(err)?;
        let mut state = self.plan.spawn().map_err(err)?;
        let mut outputs = feed(&mut state, &mut Vec::new(), &ids, past, None).map_err(err)?;
        outputs.remove(0);
        Ok(Prefix::new(ids, outputs))
    }

    /// Tokens of the default template's head that every session starts from (0: none).
    pub fn prefilled_head_tokens(&self) -> usize {
        self.prefix.len()
    }

    /// The prompt text for a single-turn question, as the model's chat template renders it.
    pub fn render_prompt(&self, system: Option<&str>, query: &str) -> Result<String, RequestError> {
        self.render(system, &[], query)
    }

    /// The prompt text for a conversation: the system turn, the earlier turns, the question.
    fn render(&self, system: Option<&str>, history: &[Turn], query: &str) -> Result<String, RequestError> {
        let mut messages = Vec::with_capacity(history.len() + 2);
        if let Some(s) = system {
            messages.push(Message { role: "system", content: s });
        }
        messages.extend(history.iter().map(|t| Message { role: t.speaker.role(), content: &t.text }));
        messages.push(Message { role: "user", content: query });
        self.template.render(&messages).map_err(|e| RequestError::Inference(format!("chat template: {e}")))
    }

    /// The prompt token ids for a single-turn question. Special-token text inside the query is
    /// matched like the template's own markers, as Hugging Face's tokenizer does.
    pub fn prompt_ids(&self, system: Option<&str>, query: &str) -> Result<Vec<u32>, RequestError> {
        self.ids(system, &[], query)
    }

    fn ids(&self, system: Option<&str>, history: &[Turn], query: &str) -> Result<Vec<u32>, RequestError> {
        let text = self.render(system, history, query)?;
        let enc = self.tokenizer.encode(text, false).map_err(|e| RequestError::Inference(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos_id);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The token ids of `prompt` within `budget` tokens: the conversation rendered with the chat
    /// template, keeping the most recent turns (the oldest go first, then the system turn),
    /// then any text to continue (not counted: it is a bounded tail). Empty when that text is
    /// empty (nothing to finish; text that ends a sentence gets one sentence more). A question
    /// that alone passes the budget is refused, naming `setting`.
    pub fn tokens(&self, prompt: &Prompt, budget: usize, setting: &'static str) -> Result<Vec<u32>, RequestError> {
        if prompt.query.trim().is_empty() {
            return Err(RequestError::EmptyQuery);
        }
        if prompt.continue_from.as_ref().is_some_and(|shown| shown.trim().is_empty()) {
            return Ok(Vec::new());
        }
        let (mut system, mut from) = (prompt.system.as_deref(), 0);
        let mut ids = loop {
            let ids = self.ids(system, &prompt.history[from..], &prompt.query)?;
            if ids.len() <= budget {
                break ids;
            }
            if from < prompt.history.len() {
                from += 1;
            } else if system.is_some() {
                system = None;
            } else {
                return Err(RequestError::PromptTooLong { tokens: ids.len(), limit: budget, setting });
            }
        };
        if let Some(shown) = &prompt.continue_from {
            ids.extend(self.encode_text(shown)?);
        }
        Ok(ids)
    }

    /// Token ids of plain text (no template, special-token text matched as such).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, RequestError> {
        Ok(self.tokenizer.encode(text, false).map_err(|e| RequestError::Inference(format!("tokenizer: {e}")))?.get_ids().to_vec())
    }

    pub fn context_length(&self) -> usize {
        self.manifest.context_length
    }
}

fn load_tokenizer(dir: &Path, manifest: &Manifest) -> Result<Tokenizer, LoadError> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(LoadError::MissingFile { path, problem: "is missing".into() });
    }
    let tokenizer =
        Tokenizer::from_file(&path).map_err(|e| LoadError::BadTokenizer { path: path.clone(), detail: e.to_string() })?;
    let size = tokenizer.get_vocab_size(true);
    if size > manifest.architecture.vocab_size {
        return Err(LoadError::VocabularyMismatch {
            path,
            problem: format!(
                "the tokenizer has {size} tokens but the model's vocabulary holds {}; \
                 the tokenizer belongs to another model",
                manifest.architecture.vocab_size
            ),
        });
    }
    Ok(tokenizer)
}
