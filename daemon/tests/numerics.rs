//! tract (the engine) against onnxruntime on the same model.onnx: prefill and decode logits.

mod common;

use mulmd::engine::PrefixCache;

/// Largest |tract − onnxruntime| over a step's logits, relative to the logit scale (min 1).
/// Both run float32 kernels with different summation orders; 1e-4 of the scale is far above
/// that rounding and far below any real wiring error (which moves logits by O(scale)).
const RELATIVE_TOLERANCE: f32 = 1e-4;

/// How the prompt reaches the model.
#[derive(Clone, Copy, PartialEq)]
enum Start {
    /// Every prompt token fed in one pass.
    Cold,
    /// The daemon's path: the template head from the cache prefilled at load, the rest fed.
    ReusedHead,
    /// A follow-up's path: all but the last few prompt tokens from the cache an earlier
    /// prompt (the same start) left in the engine's shared prompt cache.
    CachedPrompt,
}

fn check(name: &str, start: Start) {
    let (Some(model), Some(reference)) = (common::load(name), common::reference(name)) else { return };
    let mut session = model.session().unwrap();
    let cache = std::sync::Arc::new(PrefixCache::keeping(1 << 30, 1));
    if start == Start::CachedPrompt {
        session.share_prefixes(cache.clone());
        let earlier = &reference.steps[0].fed[..reference.steps[0].fed.len() - 4];
        session.forward_prompt(earlier).unwrap();
        assert_eq!(cache.len(), 1, "{name}: the earlier prompt's cache should be kept");
    }
    if start == Start::ReusedHead {
        assert!(
            model.prefilled_head_tokens() > 0 && model.prefilled_head_tokens() < reference.prompt_ids.len(),
            "{name}: the template head ({} tokens) should cover part of the prompt",
            model.prefilled_head_tokens()
        );
    }
    assert_eq!(
        model.prompt_ids(None, "How do I remove odor from inside my shoes?").unwrap(),
        reference.prompt_ids,
        "the engine's tokenizer and chat template must give the ids onnxruntime was fed"
    );
    for (i, step) in reference.steps.iter().enumerate() {
        let got = match (i, start) {
            (0, Start::ReusedHead) => {
                let (logits, reused) = session.forward_prompt(&step.fed).unwrap();
                assert_eq!(reused, model.prefilled_head_tokens(), "{name}: the head should be reused");
                logits
            }
            (0, Start::CachedPrompt) => {
                let (logits, reused) = session.forward_prompt(&step.fed).unwrap();
                assert_eq!(reused, step.fed.len() - 4, "{name}: the earlier prompt should be reused whole");
                logits
            }
            _ => session.forward(&step.fed).unwrap(),
        };
        assert_eq!(got.len(), step.logits.len());
        let scale = step.logits.iter().fold(1.0f32, |m, l| m.max(l.abs()));
        let err = got.iter().zip(&step.logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(
            err <= RELATIVE_TOLERANCE * scale,
            "{name} step {i} ({} tokens fed): max |Δlogit| {err} exceeds {} (scale {scale})",
            step.fed.len(),
            RELATIVE_TOLERANCE * scale
        );
        let argmax = mulmd_argmax(&got);
        assert_eq!(argmax, reference.greedy_tokens[i], "{name} step {i}: greedy token differs");
    }
}

fn mulmd_argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32
}

#[test]
fn tiny_float32_matches_onnxruntime() {
    check("tiny", Start::Cold);
}

#[test]
fn tiny_q4_matches_onnxruntime() {
    check("tiny-q4", Start::Cold);
}

#[test]
fn tiny_q8_matches_onnxruntime() {
    check("tiny-q8", Start::Cold);
}

/// Q4_1 blocks kept as SmolLM2's GGUF holds them: the codes' part on the integer kernels, the
/// blocks' offsets against the activation's block sums.
#[test]
fn tiny_q4_1_matches_onnxruntime() {
    check("tiny-q4_1", Start::Cold);
}

#[test]
fn smollm2_matches_onnxruntime() {
    check("smollm2", Start::Cold);
}

#[test]
fn tiny_float32_from_the_prefilled_head_matches_onnxruntime() {
    check("tiny", Start::ReusedHead);
}

#[test]
fn tiny_q4_from_the_prefilled_head_matches_onnxruntime() {
    check("tiny-q4", Start::ReusedHead);
}

#[test]
fn tiny_q8_from_the_prefilled_head_matches_onnxruntime() {
    check("tiny-q8", Start::ReusedHead);
}

#[test]
fn smollm2_from_the_prefilled_head_matches_onnxruntime() {
    check("smollm2", Start::ReusedHead);
}

#[test]
fn tiny_q4_from_an_earlier_prompts_cache_matches_onnxruntime() {
    check("tiny-q4", Start::CachedPrompt);
}

#[test]
fn tiny_q4_1_from_an_earlier_prompts_cache_matches_onnxruntime() {
    check("tiny-q4_1", Start::CachedPrompt);
}

#[test]
fn tiny_q8_from_an_earlier_prompts_cache_matches_onnxruntime() {
    check("tiny-q8", Start::CachedPrompt);
}

#[test]
fn smollm2_from_an_earlier_prompts_cache_matches_onnxruntime() {
    check("smollm2", Start::CachedPrompt);
}

/// The paper authors' layout: a torch.save training checkpoint with their tokenizer and chat
/// template, exported without torch.
#[test]
fn a_swen_checkpoint_matches_onnxruntime() {
    check("swen-demo", Start::Cold);
}

#[test]
fn a_swen_checkpoint_from_the_prefilled_head_matches_onnxruntime() {
    check("swen-demo", Start::ReusedHead);
}
