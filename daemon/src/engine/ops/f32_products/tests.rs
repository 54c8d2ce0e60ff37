use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ndarray::Dimension;

use super::*;
use crate::engine::ops::product_rewrite::WeightProduct;
use crate::engine::ops::shares::PARALLEL_PRODUCT;

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `y[r, j] = Σ_i w[j][i] · a[r, i]` in float64, `w` indexed `[j * k + i]`.
fn reference(w: &[f32], a: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for r in 0..m {
        for j in 0..n {
            y[r * n + j] = (0..k).map(|i| w[j * k + i] as f64 * a[r * k + i] as f64).sum();
        }
    }
    y
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f64, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5 * scale, "{what}: element {i} is {g}, float64 gives {w}");
    }
}

/// `w` (`[n, k]`) as panel weights, through a `[n, k]` tensor.
fn panels_of(w: &[f32], n: usize, k: usize) -> PanelWeights {
    let tensor = tensor1(w).into_shape(&[n, k]).unwrap();
    PanelWeights::new(&tensor, &WeightAxes { n, k, n_axis: 0, contracted: vec![1] }).unwrap()
}

type Kernel = unsafe fn(&PanelWeights, &[f32], usize, &OutputShare);

/// Every kernel this CPU runs, by name.
fn kernels_here() -> Vec<(&'static str, Kernel)> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut here: Vec<(&'static str, Kernel)> = vec![("portable", |w, a, m, out| kernels::portable(w, a, m, out))];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            here.push(("avx2", kernels::avx2));
        }
        if std::is_x86_feature_detected!("avx512f") {
            here.push(("avx512", kernels::avx512));
        }
    }
    here
}

#[test]
fn products_match_float64_for_every_tile_and_tail() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // n: whole panels and a part panel; k: multiples of the 4-way unroll and not; m: decode,
    // whole tiles of 4, 6 (AVX2) and 12 (AVX-512), and leftover rows after each.
    for (n, k) in [(16, 8), (40, 7), (33, 64), (128, 130), (5, 1)] {
        let w = random(&mut rng, n * k);
        let panels = panels_of(&w, n, k);
        for m in [1, 3, 4, 5, 6, 8, 9, 11, 12, 17, 25] {
            let a = random(&mut rng, m * k);
            let want = reference(&w, &a, m, n, k);
            for (name, kernel) in kernels_here() {
                let mut out = vec![f32::NAN; m * n];
                // SAFETY: kernels_here lists only kernels this CPU runs.
                unsafe { kernel(&panels, &a, m, &OutputShare::whole(&mut out, n)) };
                assert_close(&out, &want, &format!("{name}, m = {m}, n = {n}, k = {k}"));
            }
        }
    }
}

/// The inputs whose lines of the next panel pass `pass` of `passes` asks for over `k` inputs.
fn asked(pass: usize, passes: usize, k: usize) -> Vec<usize> {
    let fetch = kernels::Fetch { next: std::ptr::null(), first: pass, every: passes };
    let mut countdown = fetch.first;
    (0..k).filter(|_| fetch.due(&mut countdown)).collect()
}

#[test]
fn a_prompts_passes_ask_for_every_line_of_the_next_panel_once() {
    // Asking for a line twice costs an instruction; never asking leaves that line to come
    // from memory when the next panel's first pass reads it.
    // (`panels` checks in debug builds that it makes as many passes as `passes` says.)
    for (tile, passes) in [(6, kernels::passes::<6> as fn(usize) -> usize), (12, kernels::passes::<12>), (4, kernels::passes::<4>)] {
        for m in 2..=40 {
            let passes = passes(m);
            for k in [7, 64, 576] {
                let mut all: Vec<usize> = (0..passes).flat_map(|pass| asked(pass, passes, k)).collect();
                all.sort_unstable();
                assert_eq!(all, (0..k).collect::<Vec<_>>(), "tiles of {tile}, m = {m}, k = {k}");
            }
        }
    }
    assert!(asked(0, 1, 64).len() == 64, "one pass asks for the whole next panel");
    let none = kernels::Fetch::NONE;
    let mut countdown = none.first;
    assert!((0..4096).all(|_| !none.due(&mut countdown)), "a decode step asks for nothing");
}

#[test]
fn weights_are_read_in_any_axis_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (n, k1, k2) = (24, 3, 5);
    let k = k1 * k2;
    // The logical weight W[j, i], i = i1 · k2 + i2 (the contracted axes in the weight's order).
    let w = random(&mut rng, n * k);
    let value = |j: usize, i1: usize, i2: usize| w[j * k + i1 * k2 + i2];
    let a = random(&mut rng, 2 * k);
    let want = reference(&w, &a, 2, n, k);
    // (shape, output axis, contracted axes, W at a multi-index)
    type Layout = (Vec<usize>, usize, Vec<usize>, fn(&[usize]) -> (usize, usize, usize));
    let layouts: Vec<Layout> = vec![
        (vec![n, k1, k2], 0, vec![1, 2], |ix| (ix[0], ix[1], ix[2])),
        (vec![k1, k2, n], 2, vec![0, 1], |ix| (ix[2], ix[0], ix[1])),
        (vec![k1, n, k2], 1, vec![0, 2], |ix| (ix[1], ix[0], ix[2])),
        (vec![k1, 1, k2, n], 3, vec![0, 2], |ix| (ix[3], ix[0], ix[2])),
        (vec![k1, k2, n, 1], 2, vec![0, 1], |ix| (ix[2], ix[0], ix[1])),
    ];
    for (shape, n_axis, contracted, pick) in layouts {
        let tensor = Tensor::from_shape(&shape, &tract_ndarray::ArrayD::from_shape_fn(shape.clone(), |ix| {
            let (j, i1, i2) = pick(ix.slice());
            value(j, i1, i2)
        }).into_raw_vec_and_offset().0).unwrap();
        let panels = PanelWeights::new(&tensor, &WeightAxes { n, k, n_axis, contracted }).unwrap();
        let mut out = vec![f32::NAN; 2 * n];
        panels.matmul(&a, 2, &mut out);
        assert_close(&out, &want, &format!("weight of shape {shape:?}"));
    }
}

#[test]
fn products_split_over_threads_equal_the_single_threaded_ones() {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, k) = (1000, 300);
    let w = random(&mut rng, n * k);
    let panels = panels_of(&w, n, k);
    let pool = Executor::multithread(3);
    for m in [1, 6] {
        assert!(m * n * k >= PARALLEL_PRODUCT, "large enough to be split");
        let a = random(&mut rng, m * k);
        let mut single = vec![f32::NAN; m * n];
        panels.matmul(&a, m, &mut single);
        for round in 0..20 {
            let mut split = vec![f32::NAN; m * n];
            multithread_tract_scope(pool.clone(), || panels.matmul(&a, m, &mut split));
            // Each output is one share's, summed in the same order: equal to the bit.
            assert_eq!(single, split, "m = {m}, round {round}");
        }
    }
}

/// A model `y = x · W` with `W` a constant, the einsum written as `spec`.
fn product_model(spec: &str, x_shape: &[usize], weight: Tensor) -> TypedModel {
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact(x_shape)).unwrap();
    let w = model.add_const("w", weight).unwrap();
    let axes: AxesMapping = spec.parse().unwrap();
    let y = model.wire_node("product", EinSum::new(axes, f32::datum_type()), &[x, w]).unwrap()[0];
    model.select_output_outlets(&[y]).unwrap();
    model
}

fn run(model: TypedModel, x: &Tensor) -> Tensor {
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    plan.run(tvec!(x.clone().into_tvalue())).unwrap().remove(0).into_tensor()
}

#[test]
fn rewritten_products_compute_what_tract_computes() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // ONNX MatMul's [k, n]; a tied head's [n, k]; an attention output read per head, its two
    // contracted axes merged; an output projection that gives back the unit batch axis.
    let cases: Vec<(&str, Vec<usize>, Vec<usize>)> = vec![
        ("mk,kn->mn", vec![5, 48], vec![48, 40]),
        ("bmk,nk->bmn", vec![1, 3, 32], vec![20, 32]),
        ("mhd,hdn->mn", vec![2, 4, 8], vec![4, 8, 24]),
        ("mk,kn->bmn", vec![3, 16], vec![16, 8]),
    ];
    for (spec, x_shape, w_shape) in cases {
        let w = Tensor::from_shape(&w_shape, &random(&mut rng, w_shape.iter().product())).unwrap();
        let x = Tensor::from_shape(&x_shape, &random(&mut rng, x_shape.iter().product())).unwrap();
        let want = run(product_model(spec, &x_shape, w.clone()), &x);
        let mut model = product_model(spec, &x_shape, w);
        assert_eq!(use_f32_products(&mut model).unwrap(), 1, "{spec}: the product is replaced");
        assert!(model.nodes().iter().any(|n| n.op_is::<WeightProduct<PanelWeights>>()), "{spec}");
        assert!(!model.nodes().iter().any(|n| n.op_is::<EinSum>()), "{spec}: tract's product and its weight are gone");
        // The product puts leading unit axes in place itself: tract's AddAxis gives them a
        // stride its vectorized element-wise kernels refuse.
        let add_axis = |n: &TypedNode| n.op_as::<AxisOp>().is_some_and(|op| matches!(op, AxisOp::Add(_)));
        assert!(!model.nodes().iter().any(add_axis), "{spec}: no AddAxis after the product");
        let got = run(model, &x);
        assert_eq!(got.shape(), want.shape(), "{spec}");
        assert_eq!(got.strides(), &*Tensor::natural_strides(got.shape()), "{spec}");
        got.close_enough(&want, Approximation::Approximate).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
}

#[test]
fn products_of_other_types_are_left_to_tract() {
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([2, 8])).unwrap();
    let w = model.add_source("w", f32::fact([8, 4])).unwrap();
    let axes: AxesMapping = "mk,kn->mn".parse().unwrap();
    let y = model.wire_node("product", EinSum::new(axes, f32::datum_type()), &[x, w]).unwrap()[0];
    model.select_output_outlets(&[y]).unwrap();
    assert_eq!(use_f32_products(&mut model).unwrap(), 0, "a product of two activations is not a weight's");
}
