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
    // (3, 300, 64) and (1, 300, 64): decode's mix of a long cache's values, one pass wide.
    for (m, k, n) in [(1, 64, 37), (4, 64, 16), (3, 20, 5), (3, 300, 64), (1, 300, 64), (12, 7, 64), (2, 33, 70), (8, 64, 9), (40, 64, 40), (24, 64, 37), (9, 33, 70), (7, 64, 100)] {
        let a = random(&mut rng, m * k);
        let w = random(&mut rng, k * n);
        for transposed in [true, false] {
            // `w` as [n, k] when transposed, [k, n] otherwise.
            let at = |l: usize, j: usize| if transposed { w[j * k + l] } else { w[l * n + j] };
            let mut y = vec![f32::NAN; m * n];
            kernels::run(transposed, &a, &w, &mut y, m, k, n, &[]);
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

#[test]
fn value_mix_of_causal_weights_reads_every_weight_that_is_not_zero() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Attention weights as a causal prompt leaves them: row i is zero past key 10 + 5i. Among
    // them a row of zeros and one whose only weight is the last key; tiles of 4 rows mix
    // short and long rows, so a tile must read as far as its longest row.
    let (m, k) = (9, 50);
    let mut a = vec![0f32; m * k];
    for i in 0..m - 2 {
        let keys = (10 + 5 * i + 1).min(k);
        a[i * k..][..keys].copy_from_slice(&random(&mut rng, keys));
    }
    a[(m - 1) * k + k - 1] = 0.5;
    for n in [64, 37] {
        let w = random(&mut rng, k * n);
        let mut y = vec![f32::NAN; m * n];
        kernels::run(false, &a, &w, &mut y, m, k, n, &[]);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|l| a[i * k + l] as f64 * w[l * n + j] as f64).sum();
                let got = y[i * n + j] as f64;
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "n {n} at [{i}, {j}]: {got} vs {want}");
            }
        }
    }
}

#[test]
fn scores_under_a_mask_are_computed_as_far_as_a_tile_of_rows_keeps_them() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // A prompt's scores (the mix of transposed keys): 11 rows in tiles of 4 and one of 3,
    // 70 keys, head size 64; row i keeps keys up to 20 + 4i, row 5 none at all.
    let (m, k, n) = (11, 64, 70);
    let limits: Vec<usize> = (0..m).map(|i| if i == 5 { 0 } else { (21 + 4 * i).min(n) }).collect();
    let a = random(&mut rng, m * k);
    let w = random(&mut rng, k * n);
    let mut y = vec![f32::NAN; m * n];
    kernels::run(false, &a, &w, &mut y, m, k, n, &limits);
    for i in 0..m {
        let tile = i / 4 * 4..(i / 4 * 4 + 4).min(m);
        let computed = (limits[tile].iter().max().unwrap().div_ceil(16) * 16).min(n);
        for j in 0..n {
            let got = y[i * n + j] as f64;
            if j < limits[i] {
                let want: f64 = (0..k).map(|l| a[i * k + l] as f64 * w[l * n + j] as f64).sum();
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "kept score [{i}, {j}]: {got} vs {want}");
            } else if j >= computed {
                assert_eq!(got, 0.0, "score [{i}, {j}] past the tile's last kept key");
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
