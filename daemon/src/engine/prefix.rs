//! The chat template's fixed head (system prompt and role markers), prefilled once when the
//! model loads and shared read-only by every session.
//!
//! A causal model's KV cache for a prefix depends on the prefix alone, so a prompt that starts
//! with the head's tokens can start from the head's cache and feed only the rest: for SmolLM2
//! that is 24 of the 40 tokens of a typical question. A prompt that shares only part of the
//! head (a custom system prompt keeps `<|im_start|>system\n`) reuses that part. Reuse changes the
//! logits only by float rounding (the same products, blocked differently), which the
//! tract-vs-onnxruntime tests bound.

use tract_onnx::prelude::*;

/// The head's token ids and the KV cache (one tensor per layer and kind, `[1, kv_heads,
/// len, head_dim]`) after feeding them, shared read-only: a session copies the part it reuses
/// into its own cache (see `Session::restart`).
#[derive(Default)]
pub(crate) struct Prefix {
    ids: Vec<u32>,
    kv: TVec<TValue>,
}

impl Prefix {
    pub(crate) fn new(ids: Vec<u32>, kv: TVec<TValue>) -> Self {
        Self { ids, kv }
    }

    /// The token ids whose cache this holds.
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Tokens held.
    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// How many leading tokens of `prompt` the cache can stand in for. At least one prompt
    /// token is always left to feed, since its logits are the ones the caller needs.
    pub(crate) fn reusable(&self, prompt: &[u32]) -> usize {
        let common = self.ids.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        common.min(prompt.len().saturating_sub(1))
    }

    /// The cache of [`Prefix::ids`], one tensor per layer and kind: a session starting from
    /// it copies what it needs (see `Session::restart`), never writes it.
    pub(crate) fn kv(&self) -> &TVec<TValue> {
        &self.kv
    }
}

/// The longest run of token ids every single-turn prompt with the default system prompt
/// starts with: the common prefix of two renderings whose questions differ from their first
/// character. Tokens where the template's last marker could merge with the question are thus
/// left out.
pub(crate) fn head_ids<E>(prompt_ids: impl Fn(&str) -> Result<Vec<u32>, E>) -> Result<Vec<u32>, E> {
    let a = prompt_ids("What is the time?")?;
    let b = prompt_ids("7 times 8")?;
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    Ok(a[..common].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(ids: &[u32]) -> Prefix {
        let kv = (0..2).map(|_| Tensor::zero::<f32>(&[1, 2, ids.len(), 4]).unwrap().into_tvalue()).collect();
        Prefix::new(ids.to_vec(), kv)
    }

    #[test]
    fn reuses_the_common_part_and_leaves_one_token_to_feed() {
        let p = prefix(&[1, 2, 3, 4]);
        assert_eq!(p.reusable(&[1, 2, 3, 4, 9, 9]), 4);
        assert_eq!(p.reusable(&[1, 2, 7, 4, 9]), 2, "a custom system prompt shares only its start");
        assert_eq!(p.reusable(&[5, 2, 3]), 0);
        assert_eq!(p.reusable(&[1, 2, 3, 4]), 3, "the last prompt token must still be fed");
        assert_eq!(p.reusable(&[]), 0);
        assert_eq!(Prefix::default().reusable(&[1, 2]), 0);
    }

    #[test]
    fn the_head_stops_where_the_questions_begin() {
        // A fake tokenizer: one id per character of "<head>" + question.
        let ids = |q: &str| Ok::<_, ()>(format!("<s>user:{q}").chars().map(|c| c as u32).collect());
        assert_eq!(head_ids(ids).unwrap().len(), "<s>user:".len());
    }
}
