use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_transformers::ops::scaled_masked_softmax::ScaledMaskedSoftmax;

use super::*;
use crate::engine::ops::attention_products::use_activation_products;
use crate::engine::ops::softmax::use_masked_softmax;

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_shape(shape, &values).unwrap()
}

/// A causal mask `[1, 1, positions, keys]` (the last `positions` keys are the rows' own): a
/// float one (a bias where kept, −∞ where masked) or a boolean one.
fn causal(rng: &mut ChaCha8Rng, positions: usize, keys: usize, boolean: bool) -> Tensor {
    let keep = |i: usize| i % keys <= keys - positions + i / keys;
    let shape = [1, 1, positions, keys];
    if boolean {
        Tensor::from_shape(&shape, &(0..positions * keys).map(keep).collect::<Vec<bool>>()).unwrap()
    } else {
        let values: Vec<f32> = (0..positions * keys).map(|i| if keep(i) { rng.random_range(-1.0f32..1.0) } else { f32::NEG_INFINITY }).collect();
        Tensor::from_shape(&shape, &values).unwrap()
    }
}

/// Attention as tract makes it of mulm-export's graph: 2 key heads of 4 query heads each, head
/// size 64, `positions` new positions against `keys` keys (the cache and themselves).
fn attention_model(positions: usize, keys: usize, mask: &Tensor, post_softmax_mask: bool) -> TypedModel {
    let mut model = TypedModel::default();
    let q = model.add_source("q", f32::fact([1, 2, 4, positions, 64])).unwrap();
    let k = model.add_source("k", f32::fact([1, 2, keys, 64])).unwrap();
    let m = model.add_source("mask", TypedFact::shape_and_dt_of(mask)).unwrap();
    let v = model.add_source("v", f32::fact([1, 2, keys, 64])).unwrap();
    let einsum = |spec: &str| EinSum::new(spec.parse().unwrap(), f32::datum_type());
    let scores = model.wire_node("qk", einsum("abcmk,abnk->bcmn"), &[q, k]).unwrap()[0];
    let softmax = ScaledMaskedSoftmax { scale: std::sync::Arc::new(tensor0(0.125f32)), post_softmax_mask };
    let probs = model.wire_node("softmax", softmax, &[scores, m]).unwrap()[0];
    let y = model.wire_node("pv", einsum("bcmn,abnk->bcmk"), &[probs, v]).unwrap()[0];
    model.select_output_outlets(&[y]).unwrap();
    model
}

fn run(model: TypedModel, inputs: &[Tensor]) -> Tensor {
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect()).unwrap().remove(0).into_tensor()
}

use tract_onnx::tract_core::ops::einsum::EinSum;

#[test]
fn attention_equals_the_three_ops_it_replaces_to_the_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // Decode (one position), a prompt continuing a conversation (12 positions after 5 cached
    // keys: 48 rows, a tile of 32 and one of 16), a longer one (40 positions: 160 rows, 5
    // tiles); float masks, boolean masks with and without zeroing after the softmax.
    for (positions, keys) in [(1, 9), (12, 17), (40, 40)] {
        for (boolean, post) in [(false, false), (true, false), (true, true)] {
            let mask = causal(&mut rng, positions, keys, boolean);
            let inputs = [random(&mut rng, &[1, 2, 4, positions, 64]), random(&mut rng, &[1, 2, keys, 64]), mask.clone(), random(&mut rng, &[1, 2, keys, 64])];
            let case = format!("{positions} positions, {keys} keys, boolean {boolean}, post {post}");
            let original = attention_model(positions, keys, &mask, post);
            let mut chain = original.clone();
            assert_eq!(use_masked_softmax(&mut chain).unwrap(), 1, "{case}");
            assert_eq!(use_activation_products(&mut chain).unwrap(), 2, "{case}");
            let mut fused = chain.clone();
            assert_eq!(use_attention(&mut fused).unwrap(), 1, "{case}");
            assert_eq!(fused.nodes().iter().filter(|n| n.op_is::<ActivationProduct>() || n.op_is::<MaskedSoftmax>()).count(), 0, "{case}");
            let got = run(fused, &inputs);
            let want = run(chain, &inputs);
            let (g, w) = (got.to_plain_array_view::<f32>().unwrap(), want.to_plain_array_view::<f32>().unwrap());
            let diffs: Vec<(usize, f32, f32)> = g.iter().zip(w).enumerate().filter(|(_, (a, b))| a.to_bits() != b.to_bits()).map(|(i, (a, b))| (i, *a, *b)).take(5).collect();
            assert!(diffs.is_empty(), "{case}: against the chain of the engine's ops: {diffs:?}");
            got.close_enough(&run(original, &inputs), Approximation::Approximate).unwrap_or_else(|e| panic!("{case}: against tract: {e}"));
        }
    }
}

#[test]
fn scores_with_a_second_reader_stay_on_the_chain() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mask = causal(&mut rng, 3, 3, false);
    let mut model = attention_model(3, 3, &mask, false);
    // The probabilities are also an output of the model (as a debugging export might have).
    let probs = model.node(model.node_by_name("pv").unwrap().id).inputs[0];
    let y = model.output_outlets().unwrap()[0];
    model.select_output_outlets(&[y, probs]).unwrap();
    use_masked_softmax(&mut model).unwrap();
    use_activation_products(&mut model).unwrap();
    assert_eq!(use_attention(&mut model).unwrap(), 0);
}

#[test]
fn a_mask_that_does_not_fit_is_an_error_that_names_both_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mask = causal(&mut rng, 2, 2, false);
    let model = attention_model(2, 2, &mask, false);
    let mut fused = model.clone();
    use_masked_softmax(&mut fused).unwrap();
    use_activation_products(&mut fused).unwrap();
    assert_eq!(use_attention(&mut fused).unwrap(), 1);
    let op = fused.nodes().iter().find_map(|n| n.op_as::<Attention>()).unwrap().clone();
    let inputs: TVec<TValue> = tvec![
        random(&mut rng, &[1, 2, 4, 2, 64]).into_tvalue(),
        random(&mut rng, &[1, 2, 2, 64]).into_tvalue(),
        causal(&mut rng, 3, 3, false).into_tvalue(),
        random(&mut rng, &[1, 2, 2, 64]).into_tvalue(),
    ];
    let err = op.eval(&EvalContext::out_of_plan(), inputs).unwrap_err().to_string();
    assert!(err.contains("[1, 1, 3, 3]") && err.contains("[2, 4, 2, 2]"), "{err}");
}

/// With `--threads`, a tile of each key head may run on another thread: the output must be
/// the single thread's to the bit, for decode against a long cache and for a prompt.
#[test]
fn attention_split_over_threads_equals_the_single_threaded_one() {
    use crate::engine::ops::shares::PARALLEL_PRODUCT;
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let pool = Executor::multithread(3);
    for (positions, keys) in [(1, 300), (40, 40), (12, 200)] {
        assert!(2 * 4 * positions * keys * 128 >= PARALLEL_PRODUCT, "large enough to be split");
        let mask = causal(&mut rng, positions, keys, false);
        let mut fused = attention_model(positions, keys, &mask, false);
        use_masked_softmax(&mut fused).unwrap();
        use_activation_products(&mut fused).unwrap();
        assert_eq!(use_attention(&mut fused).unwrap(), 1);
        let op = fused.nodes().iter().find_map(|n| n.op_as::<Attention>()).unwrap().clone();
        let inputs: TVec<TValue> = tvec![
            random(&mut rng, &[1, 2, 4, positions, 64]).into_tvalue(),
            random(&mut rng, &[1, 2, keys, 64]).into_tvalue(),
            mask.into_tvalue(),
            random(&mut rng, &[1, 2, keys, 64]).into_tvalue(),
        ];
        let single = op.eval(&EvalContext::out_of_plan(), inputs.clone()).unwrap().remove(0);
        for round in 0..10 {
            let split = multithread_tract_scope(pool.clone(), || op.eval(&EvalContext::out_of_plan(), inputs.clone())).unwrap().remove(0);
            let (s, p) = (single.to_plain_array_view::<f32>().unwrap(), split.to_plain_array_view::<f32>().unwrap());
            assert!(s.iter().zip(p.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{positions} positions, {keys} keys, round {round}");
        }
    }
}
