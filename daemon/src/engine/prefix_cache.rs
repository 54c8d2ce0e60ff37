//! KV caches of recent prompts, kept across requests and conversations so that a prompt
//! which repeats an earlier one's start pays only for its new tokens.
//!
//! Assistants resend their context: Home Assistant puts a system prompt listing every exposed
//! device (1,000–3,000 tokens) before each question, and a follow-up turn resends the whole
//! conversation. A causal model's cache for a run of tokens depends on those tokens alone, so
//! the cache kept after one prompt stands in for the same leading tokens of any later prompt.
//!
//! The contract:
//! - **Shared read-only.** An entry's tensors are never written: a session that reuses a whole
//!   entry holds the same `Arc`s (a forward pass makes new cache tensors rather than growing
//!   these), and one that shares only part of it gets copies cut at the first difference and
//!   recomputes from there.
//! - **Bounded.** Entries' tensor bytes never pass the budget; the least recently used go
//!   first, a prompt whose cache alone passes the budget is not kept, and budget 0 keeps
//!   nothing.
//! - **Deduplicated along a conversation.** An entry whose tokens start a newer prompt (the
//!   previous turn of the same conversation) is replaced by the newer one, which covers it.
//! - **Exact up to rounding.** Reused tokens change the logits only by float rounding (the
//!   same products, blocked differently), as the template head's reuse does (`prefix`).

use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use super::ops::kv_cache;
use super::prefix::Prefix;

/// Prompts that extend the model's prefilled template head by fewer tokens than this are not
/// kept: a single short question prefills in one short pass anyway, and keeping every one
/// would push a long system prompt's entry out.
pub(crate) const MIN_KEPT_TOKENS: usize = 64;

/// The cache itself; one per engine, shared by its workers.
pub struct PrefixCache {
    budget: usize,
    min_new: usize,
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    list: Vec<Entry>,
    bytes: usize,
    /// A counter standing in for time: higher is more recently used.
    clock: u64,
}

struct Entry {
    prefix: Arc<Prefix>,
    bytes: usize,
    used: u64,
}

/// What a lookup found: the entry and how many of the prompt's leading tokens it covers.
pub(crate) struct Hit {
    pub(crate) prefix: Arc<Prefix>,
    pub(crate) tokens: usize,
}

impl PrefixCache {
    /// A cache holding at most `budget_bytes` of KV tensors, keeping prompts of at least
    /// [`MIN_KEPT_TOKENS`] tokens past the template head.
    pub fn new(budget_bytes: usize) -> Self {
        Self::keeping(budget_bytes, MIN_KEPT_TOKENS)
    }

    /// As [`PrefixCache::new`], keeping prompts of at least `min_new` tokens past the template
    /// head (tests and tools use 1).
    pub fn keeping(budget_bytes: usize, min_new: usize) -> Self {
        Self { budget: budget_bytes, min_new: min_new.max(1), entries: Mutex::default() }
    }

    /// Bytes of KV tensors held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Prompts held now.
    pub fn len(&self) -> usize {
        self.lock().list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry covering the most leading tokens of `prompt` (never all of them: the last
    /// must be fed for its logits), marked as used; None when none covers any.
    pub(crate) fn lookup(&self, prompt: &[u32]) -> Option<Hit> {
        let mut e = self.lock();
        e.clock += 1;
        let clock = e.clock;
        let best = e.list.iter_mut().map(|x| (x.prefix.reusable(prompt), x)).filter(|(n, _)| *n > 0).max_by_key(|(n, x)| (*n, x.used))?;
        best.1.used = clock;
        Some(Hit { prefix: best.1.prefix.clone(), tokens: best.0 })
    }

    /// Keeps the cache of `ids` (`kv`: one tensor per layer and kind, `[1, kv_heads,
    /// ids.len(), head_dim]`), of which the first `ids.len() - own` are the template head every
    /// prompt shares. Evicts the least recently used entries to stay within the budget.
    pub(crate) fn keep(&self, ids: &[u32], kv: &TVec<TValue>, own: usize) {
        // With the room each tensor keeps to grow (see `ops::kv_cache`): what the budget bounds
        // is memory held.
        let bytes: usize = kv.iter().map(|t| kv_cache::bytes(t)).sum();
        if own < self.min_new || bytes > self.budget {
            return;
        }
        let mut e = self.lock();
        e.clock += 1;
        let clock = e.clock;
        // Already held, as this prompt or as the start of a longer one: just mark it used.
        if let Some(x) = e.list.iter_mut().find(|x| x.prefix.ids().starts_with(ids)) {
            x.used = clock;
            return;
        }
        // Earlier turns of this conversation are covered by the new entry.
        let mut freed = 0;
        e.list.retain(|x| {
            let covered = ids.starts_with(x.prefix.ids());
            freed += if covered { x.bytes } else { 0 };
            !covered
        });
        e.bytes -= freed;
        while e.bytes + bytes > self.budget {
            let Some(oldest) = e.list.iter().enumerate().min_by_key(|(_, x)| x.used).map(|(i, _)| i) else { break };
            let gone = e.list.swap_remove(oldest);
            e.bytes -= gone.bytes;
        }
        e.bytes += bytes;
        e.list.push(Entry { prefix: Arc::new(Prefix::new(ids.to_vec(), kv.clone())), bytes, used: clock });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // The entries stay consistent across a panic elsewhere: every update completes
        // under the lock without calling out.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `ids.len()` positions: 2 tensors of 4 floats per position = 32 bytes.
    fn kv(len: usize) -> TVec<TValue> {
        (0..2).map(|_| Tensor::zero::<f32>(&[1, 1, len, 4]).unwrap().into_tvalue()).collect()
    }

    fn keep(c: &PrefixCache, ids: &[u32]) {
        c.keep(ids, &kv(ids.len()), ids.len());
    }

    #[test]
    fn the_longest_shared_start_wins_and_the_last_token_is_left_to_feed() {
        let c = PrefixCache::keeping(1 << 20, 1);
        keep(&c, &[1, 2, 3]);
        keep(&c, &[1, 2, 7, 8, 9]);
        let hit = c.lookup(&[1, 2, 7, 8, 5]).unwrap();
        assert_eq!((hit.tokens, hit.prefix.ids()), (4, &[1, 2, 7, 8, 9][..]));
        assert_eq!(c.lookup(&[1, 2, 3]).unwrap().tokens, 2, "a repeat still feeds its last token");
        assert!(c.lookup(&[9, 9]).is_none());
    }

    #[test]
    fn a_later_turn_replaces_the_earlier_one_it_extends() {
        let c = PrefixCache::keeping(1 << 20, 1);
        keep(&c, &[1, 2, 3]);
        keep(&c, &[1, 2, 3, 4, 5]);
        assert_eq!((c.len(), c.bytes()), (1, 5 * 32));
        keep(&c, &[1, 2, 3]);
        assert_eq!((c.len(), c.bytes()), (1, 5 * 32), "a prompt already covered adds nothing");
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_and_refuses_what_cannot_fit() {
        let c = PrefixCache::keeping(10 * 32, 1);
        keep(&c, &[1, 1, 1, 1]);
        keep(&c, &[2, 2, 2, 2]);
        c.lookup(&[1, 1, 1, 1, 0]); // [1..] is now the more recently used
        keep(&c, &[3, 3, 3, 3]);
        assert!(c.bytes() <= 10 * 32);
        assert!(c.lookup(&[2, 2, 2, 2, 0]).is_none(), "the least recently used went first");
        assert!(c.lookup(&[1, 1, 1, 1, 0]).is_some() && c.lookup(&[3, 3, 3, 3, 0]).is_some());
        keep(&c, &[4; 11]);
        assert!(c.lookup(&[4; 12]).is_none(), "an entry over the whole budget is not kept");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn nothing_is_kept_with_budget_zero_or_too_few_new_tokens() {
        let off = PrefixCache::keeping(0, 1);
        keep(&off, &[1, 2]);
        assert!(off.is_empty());
        let c = PrefixCache::keeping(1 << 20, 3);
        c.keep(&[1, 2, 3, 4], &kv(4), 2);
        assert!(c.is_empty(), "2 tokens past the head are under the minimum of 3");
        c.keep(&[1, 2, 3, 4], &kv(4), 3);
        assert_eq!(c.len(), 1);
    }
}
