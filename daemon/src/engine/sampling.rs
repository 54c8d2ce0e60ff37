//! Choosing the next token from logits: greedy, or temperature with top-k and top-p, seeded.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::error::RequestError;

/// How to pick tokens. `temperature == 0` is greedy (argmax) and ignores the rest.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 keeps all.
    pub top_p: f32,
    /// The same seed, model and prompt give the same tokens. None draws a fresh seed.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: None }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<(), RequestError> {
        if !(self.temperature.is_finite() && (0.0..=5.0).contains(&self.temperature)) {
            return Err(RequestError::InvalidOptions(format!(
                "temperature {} is outside 0..=5 (0 means greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RequestError::InvalidOptions(format!(
                "top_p {} is outside (0, 1] (1 keeps every token)",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Per-request sampler; reuses its buffer so sampling allocates nothing per token.
pub struct Sampler {
    cfg: Sampling,
    rng: ChaCha8Rng,
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Self {
        let seed = cfg.seed.unwrap_or_else(|| rand::rng().random());
        Self { cfg, rng: ChaCha8Rng::seed_from_u64(seed), candidates: Vec::new() }
    }

    /// The chosen token id. Non-finite logits are never chosen unless all are.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (l * inv_t, i as u32)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = if self.cfg.top_k == 0 { self.candidates.len() } else { self.cfg.top_k.min(self.candidates.len()) };
        if k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit_desc);
        let max = self.candidates[0].0;
        let mut total = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += c.0;
        }
        // Nucleus: the shortest prefix (by probability) whose mass reaches top_p.
        let mut keep = self.candidates.len();
        if self.cfg.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, c) in self.candidates.iter().enumerate() {
                mass += c.0 / total;
                if mass >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept_total: f32 = self.candidates[..keep].iter().map(|c| c.0).sum();
        let mut r = self.rng.random::<f32>() * kept_total;
        for c in &self.candidates[..keep] {
            if r < c.0 {
                return c.1;
            }
            r -= c.0;
        }
        self.candidates[keep - 1].1
    }
}

/// Index of the largest finite logit (the first on ties); 0 when none is finite.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.0 {
            best = (l, i as u32);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::default());
        assert_eq!(s.pick(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(s.pick(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let cfg = Sampling { temperature: 1.0, seed: Some(7), ..Default::default() };
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = { let mut s = Sampler::new(cfg.clone()); (0..50).map(|_| s.pick(&logits)).collect() };
        let b: Vec<u32> = { let mut s = Sampler::new(cfg.clone()); (0..50).map(|_| s.pick(&logits)).collect() };
        assert_eq!(a, b);
        let c: Vec<u32> = { let mut s = Sampler::new(Sampling { seed: Some(8), ..cfg }); (0..50).map(|_| s.pick(&logits)).collect() };
        assert_ne!(a, c, "a different seed should change at least one of 50 draws");
    }

    #[test]
    fn top_k_restricts_the_choice() {
        let cfg = Sampling { temperature: 2.0, top_k: 2, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(cfg);
        let logits = [5.0, 1.0, 4.9, 0.0, 4.8];
        for _ in 0..200 {
            assert!([0, 2].contains(&s.pick(&logits)));
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Token 0 holds ~88% of the mass: with top_p 0.5 it is the only candidate.
        let cfg = Sampling { temperature: 1.0, top_p: 0.5, seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(cfg);
        for _ in 0..200 {
            assert_eq!(s.pick(&[4.0, 1.0, 1.0, 0.0]), 0);
        }
    }

    #[test]
    fn invalid_settings_are_named() {
        let e = Sampling { temperature: -1.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("temperature"));
        let e = Sampling { top_p: 0.0, ..Default::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("top_p"));
    }
}
