use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

#[test]
fn kernels_match_float64_in_both_operand_orders() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // k and n: whole vectors of 16 and not; m: one query row (decode) and several.
    for (m, k, n) in [(1, 64, 37), (4, 64, 16), (3, 20, 5), (12, 7, 64), (2, 33, 70), (8, 64, 9), (40, 64, 40), (24, 64, 37), (9, 33, 70), (7, 64, 100)] {
        let a = random(&mut rng, m * k);
        let w = random(&mut rng, k * n);
        for transposed in [true, false] {
            // `w` as [n, k] when transposed, [k, n] otherwise.
            let at = |l: usize, j: usize| if transposed { w[j * k + l] } else { w[l * n + j] };
            let mut y = vec![f32::NAN; m * n];
            kernels::run(transposed, &a, &w, &mut y, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| a[i * k + l] as f64 * at(l, j) as f64).sum();
                    let got = y[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "transposed {transposed}, {m}×{k}×{n} at [{i}, {j}]: {got} vs {want}");
                }
            }
        }
    }
}

/// A model `y = einsum(spec, a, b)` of two inputs.
fn einsum_model(spec: &str, a: &[usize], b: &[usize]) -> TypedModel {
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact(a)).unwrap();
    let b = model.add_source("b", f32::fact(b)).unwrap();
    let axes: AxesMapping = spec.parse().unwrap();
    let y = model.wire_node("product", EinSum::new(axes, f32::datum_type()), &[a, b]).unwrap()[0];
    model.select_output_outlets(&[y]).unwrap();
    model
}

fn run(model: TypedModel, a: &Tensor, b: &Tensor) -> Tensor {
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    plan.run(tvec!(a.clone().into_tvalue(), b.clone().into_tvalue())).unwrap().remove(0).into_tensor()
}

#[test]
fn attention_einsums_compute_what_tract_computes() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    // What tract makes of mulm-export's attention (2 key heads, 4 query heads each, 3 new
    // positions, 9 cached, head size 64): scores from queries and keys, then the mix of values.
    let cases: [(&str, Vec<usize>, Vec<usize>); 3] = [
        ("abcmk,abnk->bcmn", vec![1, 2, 4, 3, 64], vec![1, 2, 9, 64]),
        ("bcmk,abkn->bcmn", vec![2, 4, 3, 9], vec![1, 2, 9, 64]),
        ("bmk,bkn->bmn", vec![3, 5, 20], vec![3, 20, 7]),
    ];
    for (spec, a_shape, b_shape) in cases {
        let a = Tensor::from_shape(&a_shape, &random(&mut rng, a_shape.iter().product())).unwrap();
        let b = Tensor::from_shape(&b_shape, &random(&mut rng, b_shape.iter().product())).unwrap();
        let want = run(einsum_model(spec, &a_shape, &b_shape), &a, &b);
        let mut model = einsum_model(spec, &a_shape, &b_shape);
        assert_eq!(use_activation_products(&mut model).unwrap(), 1, "{spec}: replaced");
        let got = run(model, &a, &b);
        assert_eq!(got.shape(), want.shape(), "{spec}");
        got.close_enough(&want, Approximation::Approximate).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
}

#[test]
fn other_einsums_are_left_to_tract() {
    // A broadcast batch, an outer product (nothing summed), and a sum over the rows' axis.
    for (spec, a, b) in [("bmk,bkn->bmn", vec![1, 3, 4], vec![2, 4, 5]), ("mk,nk->mkn", vec![2, 3], vec![4, 3]), ("mk,kn->n", vec![2, 3], vec![3, 4])] {
        let mut model = einsum_model(spec, &a, &b);
        assert_eq!(use_activation_products(&mut model).unwrap(), 0, "{spec}");
    }
}
