use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::engine::ops::op_swap::testing::{self, assert_swap_is_bit_equal, one_op_model, run};

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    testing::random(rng, shape, 4.0)
}

/// A causal mask over `positions` rows of `keys` (the last `positions` keys are the rows'
/// own), as a float mask (a bias from `rng`, −∞ where masked) or a boolean one.
fn causal(rng: &mut ChaCha8Rng, positions: usize, keys: usize, boolean: bool) -> Tensor {
    let keep = |r: usize, k: usize| k <= keys - positions + r;
    let shape = [1, 1, positions, keys];
    if boolean {
        let values: Vec<bool> = (0..positions * keys).map(|i| keep(i / keys, i % keys)).collect();
        Tensor::from_shape(&shape, &values).unwrap()
    } else {
        let values: Vec<f32> =
            (0..positions * keys).map(|i| if keep(i / keys, i % keys) { rng.random_range(-1.0f32..1.0) } else { f32::NEG_INFINITY }).collect();
        Tensor::from_shape(&shape, &values).unwrap()
    }
}

fn softmax_model(x: TypedFact, mask: TypedFact, post_softmax_mask: bool) -> TypedModel {
    one_op_model(ScaledMaskedSoftmax { scale: Arc::new(tensor0(0.125f32)), post_softmax_mask }, vec![x, mask])
}

#[test]
fn masked_softmax_equals_tracts_op_to_the_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Decode (one position against the cache), a prompt, key counts off the vector width;
    // float masks, boolean masks with and without zeroing after the softmax.
    for (heads, positions, keys) in [(9, 1, 41), (3, 7, 7), (2, 5, 21), (1, 3, 64)] {
        for (boolean, post) in [(false, false), (true, false), (true, true)] {
            let x_shape = [1, heads, positions, keys];
            let mask = causal(&mut rng, positions, keys, boolean);
            let inputs = [random(&mut rng, &x_shape), mask.clone()];
            let model = softmax_model(f32::fact(x_shape), TypedFact::shape_and_dt_of(&mask), post);
            let case = format!("{x_shape:?}, boolean {boolean}, post {post}");
            assert_swap_is_bit_equal::<ScaledMaskedSoftmax>(model, &inputs, use_masked_softmax, &case);
        }
    }
}

#[test]
fn a_symbolic_number_of_positions_and_keys_is_replaced_and_runs_at_any_length() {
    let model = TypedModel::default();
    let (s, l) = (model.symbols.sym("S"), model.symbols.sym("L"));
    let x = f32::fact(dims!(1, 3, s.clone(), l.clone()));
    let mask = f32::fact(dims!(1, 1, s, l));
    let mut model = softmax_model(x, mask, false);
    let original = model.clone();
    assert_eq!(use_masked_softmax(&mut model).unwrap(), 1);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (positions, keys) in [(1, 9), (4, 4), (2, 30)] {
        let inputs = [random(&mut rng, &[1, 3, positions, keys]), causal(&mut rng, positions, keys, false)];
        assert_eq!(run(model.clone(), &inputs), run(original.clone(), &inputs), "{positions} × {keys}");
    }
}

#[test]
fn other_masks_are_left_to_tract() {
    // A mask per head, one mask row for every position.
    for (x_shape, mask) in [(vec![1, 2, 3, 8], vec![1, 2, 3, 8]), (vec![1, 2, 3, 8], vec![1, 1, 1, 8])] {
        let mut model = softmax_model(f32::fact(&x_shape), f32::fact(&mask), false);
        assert_eq!(use_masked_softmax(&mut model).unwrap(), 0, "{x_shape:?} with {mask:?}");
    }
}

#[test]
fn a_mismatched_mask_at_run_time_is_an_error_not_a_panic() {
    let op = MaskedSoftmax::new(0.5, false).unwrap();
    let x = Tensor::zero::<f32>(&[1, 2, 3, 4]).unwrap().into_tvalue();
    let mask = Tensor::zero::<f32>(&[1, 1, 2, 4]).unwrap().into_tvalue();
    let err = op.eval(&EvalContext::out_of_plan(), tvec![x, mask]).unwrap_err();
    assert!(format!("{err:#}").contains("does not fit"), "{err:#}");
}
