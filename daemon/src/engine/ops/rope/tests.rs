use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::engine::ops::op_swap::testing::{self, assert_swap_is_bit_equal, one_op_model, run};

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    testing::random(rng, shape, 2.0)
}

/// `ApplyRope(x, cos, sin)` with the three as inputs of the given facts.
fn rope_model(x: TypedFact, cos: TypedFact, sin: TypedFact) -> TypedModel {
    one_op_model(ApplyRope, vec![x, cos, sin])
}

#[test]
fn rope_equals_tracts_apply_rope_to_the_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // Decode (one position), a prompt, SmolLM2's and mulm-28m's head widths, a batch axis.
    for (x_shape, table) in [
        (vec![1, 9, 1, 64], vec![1, 1, 1, 64]),
        (vec![1, 3, 7, 64], vec![1, 1, 7, 64]),
        (vec![2, 2, 5, 8], vec![1, 1, 5, 8]),
        (vec![4, 2], vec![4, 2]),
    ] {
        let inputs = [random(&mut rng, &x_shape), random(&mut rng, &table), random(&mut rng, &table)];
        let model = rope_model(f32::fact(&x_shape), f32::fact(&table), f32::fact(&table));
        assert_swap_is_bit_equal::<ApplyRope>(model, &inputs, use_rope, &format!("{x_shape:?}"));
    }
}

#[test]
fn a_symbolic_number_of_positions_is_replaced_and_runs_at_any_length() {
    let model = TypedModel::default();
    let s = model.symbols.sym("S");
    let x = f32::fact(dims!(1, 3, s.clone(), 8));
    let table = f32::fact(dims!(1, 1, s, 8));
    let mut model = rope_model(x, table.clone(), table);
    let original = model.clone();
    assert_eq!(use_rope(&mut model).unwrap(), 1);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for len in [1, 6] {
        let inputs = [random(&mut rng, &[1, 3, len, 8]), random(&mut rng, &[1, 1, len, 8]), random(&mut rng, &[1, 1, len, 8])];
        assert_eq!(run(model.clone(), &inputs), run(original.clone(), &inputs), "{len} positions");
    }
}

#[test]
fn other_tables_are_left_to_tract() {
    // A table per head, a table of another rank, an odd width.
    for (x_shape, table) in [(vec![1, 2, 3, 8], vec![1, 2, 3, 8]), (vec![1, 2, 3, 8], vec![3, 8]), (vec![1, 1, 3, 7], vec![1, 1, 3, 7])] {
        let mut model = rope_model(f32::fact(&x_shape), f32::fact(&table), f32::fact(&table));
        assert_eq!(use_rope(&mut model).unwrap(), 0, "{x_shape:?} with {table:?}");
    }
}

#[test]
fn mismatched_tables_at_run_time_are_an_error_not_a_panic() {
    let x = Tensor::zero::<f32>(&[1, 2, 3, 4]).unwrap().into_tvalue();
    for (table, odd) in [(vec![1, 1, 2, 4], false), (vec![1, 2, 3, 4], false), (vec![1, 1, 3, 3], true)] {
        let t = Tensor::zero::<f32>(&table).unwrap().into_tvalue();
        let x = if odd { Tensor::zero::<f32>(&[1, 2, 3, 3]).unwrap().into_tvalue() } else { x.clone() };
        let err = Rope.eval(&EvalContext::out_of_plan(), tvec![x, t.clone(), t]).unwrap_err();
        assert!(format!("{err:#}").contains("do not fit"), "{table:?}: {err:#}");
    }
}
