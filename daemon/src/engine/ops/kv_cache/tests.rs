use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_shape(shape, &values).unwrap()
}

fn append(op: &KvAppend, past: TValue, new: &Tensor) -> TValue {
    op.eval(&EvalContext::out_of_plan(), tvec![past, new.clone().into_tvalue()]).unwrap().remove(0)
}

/// The tensor's values in plain `[1, heads, len, depth]` order, however it is stored.
fn plain(t: &Tensor) -> Vec<f32> {
    let (heads, len, depth) = cache_dims(t).unwrap();
    let h = Heads::of(t).unwrap();
    (0..heads).flat_map(|i| h.head(i, len * depth).to_vec()).collect()
}

/// Where the tensor's rows lie: it moved if this changed.
fn address(t: &Tensor) -> usize {
    t.storage_as::<KvRows>().unwrap().read().floats().as_ptr() as usize
}

fn concat(a: &Tensor, b: &Tensor) -> Vec<f32> {
    plain(&Tensor::stack_tensors(2, &[a.clone(), b.clone()]).unwrap())
}

#[test]
fn appends_equal_the_concat_and_stay_in_place_until_the_room_is_used() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let op = KvAppend { limit: 4096 };
    // A prompt of 5 positions into the empty cache, then one position per decode step.
    let mut want = Tensor::zero::<f32>(&[1, 3, 0, 8]).unwrap();
    let mut cache = want.clone().into_tvalue();
    let new = random(&mut rng, &[1, 3, 5, 8]);
    cache = append(&op, cache, &new);
    want = Tensor::from_shape(&[1, 3, 5, 8], &concat(&want, &new)).unwrap();
    assert_eq!(cache.shape(), &[1, 3, 5, 8]);
    assert_eq!(plain(&cache), plain(&want));
    let room = cache.storage_as::<KvRows>().unwrap().capacity();
    assert_eq!(room, 5 + MIN_ROOM);
    let first = address(&cache);
    for step in 0..room - 5 + 1 {
        let new = random(&mut rng, &[1, 3, 1, 8]);
        cache = append(&op, cache, &new);
        want = Tensor::from_shape(&[1, 3, 6 + step, 8], &concat(&want, &new)).unwrap();
        assert_eq!(plain(&cache), plain(&want), "after step {step}");
        // The step that fills the room in place is the last to stay; the next one moves.
        assert_eq!(address(&cache) == first, 5 + step < room, "step {step}");
    }
    assert!(cache.storage_as::<KvRows>().unwrap().capacity() > room);
}

#[test]
fn a_shared_cache_is_copied_and_left_as_it_was() {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let op = KvAppend { limit: 4096 };
    let shared = append(&op, Tensor::zero::<f32>(&[1, 2, 0, 4]).unwrap().into_tvalue(), &random(&mut rng, &[1, 2, 3, 4]));
    let before = plain(&shared);
    let held = shared.clone();
    let grown = append(&op, shared, &random(&mut rng, &[1, 2, 1, 4]));
    assert_eq!(held.shape(), &[1, 2, 3, 4]);
    assert_eq!(plain(&held), before, "the prefix cache's copy must not change");
    assert_ne!(address(&grown), address(&held));
    assert_eq!(&plain(&grown)[..3 * 4], &before[..3 * 4], "head 0's first positions");
}

#[test]
fn a_plain_cache_is_taken_as_it_lies() {
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    let (past, new) = (random(&mut rng, &[1, 2, 7, 4]), random(&mut rng, &[1, 2, 2, 4]));
    let got = append(&KvAppend { limit: 4096 }, past.clone().into_tvalue(), &new);
    assert_eq!(plain(&got), concat(&past, &new));
}

#[test]
fn room_stops_at_the_context_length() {
    let mut rng = ChaCha8Rng::seed_from_u64(34);
    let op = KvAppend { limit: 20 };
    let cache = append(&op, Tensor::zero::<f32>(&[1, 1, 0, 4]).unwrap().into_tvalue(), &random(&mut rng, &[1, 1, 12, 4]));
    assert_eq!(cache.storage_as::<KvRows>().unwrap().capacity(), 20);
    // A pass past the context is the caller's error to catch; the cache still holds it.
    let cache = append(&op, cache, &random(&mut rng, &[1, 1, 10, 4]));
    assert_eq!(cache.shape(), &[1, 1, 22, 4]);
    assert_eq!(cache.storage_as::<KvRows>().unwrap().capacity(), 22);
}

#[test]
fn first_rows_cut_either_kind_and_keep_room_only_for_a_cache_with_room() {
    let mut rng = ChaCha8Rng::seed_from_u64(35);
    let full = random(&mut rng, &[1, 2, 6, 4]);
    let rows = append(&KvAppend { limit: 4096 }, Tensor::zero::<f32>(&[1, 2, 0, 4]).unwrap().into_tvalue(), &full);
    let want = plain(&full.slice(2, 0, 4).unwrap());
    let cut = first_rows(&rows, 4, 4096).unwrap();
    assert_eq!(cut.shape(), &[1, 2, 4, 4]);
    assert_eq!(plain(&cut), want);
    assert_eq!(cut.storage_as::<KvRows>().unwrap().capacity(), 4 + MIN_ROOM);
    let cut = first_rows(&full, 4, 4096).unwrap();
    assert!(cut.storage_as::<KvRows>().is_none(), "a plain cache stays plain for tract's Concat");
    assert_eq!(plain(&cut), want);
    assert_eq!(bytes(&rows), 2 * (6 + MIN_ROOM) * 4 * 4, "the room counts");
    assert_eq!(bytes(&full), 2 * 6 * 4 * 4);
}

#[test]
fn new_rows_that_do_not_fit_are_an_error_naming_both_shapes() {
    let op = KvAppend { limit: 4096 };
    let past = Tensor::zero::<f32>(&[1, 2, 3, 4]).unwrap().into_tvalue();
    let err = op.eval(&EvalContext::out_of_plan(), tvec![past, Tensor::zero::<f32>(&[1, 3, 1, 4]).unwrap().into_tvalue()]).unwrap_err().to_string();
    assert!(err.contains("[1, 3, 1, 4]") && err.contains("[1, 2, 3, 4]"), "{err}");
}

#[test]
fn tract_ops_refuse_a_cache_with_room_rather_than_misread_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(36);
    let rows = append(&KvAppend { limit: 4096 }, Tensor::zero::<f32>(&[1, 1, 0, 4]).unwrap().into_tvalue(), &random(&mut rng, &[1, 1, 2, 4]));
    assert!(rows.try_as_plain_ram().is_err());
}

use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_transformers::ops::scaled_masked_softmax::ScaledMaskedSoftmax;

use crate::engine::ops::attention::use_attention;
use crate::engine::ops::attention_products::use_activation_products;
use crate::engine::ops::softmax::use_masked_softmax;

/// One attention layer with its cache, as tract makes it of mulm-export's graph: 2 key heads
/// of 4 query heads each, head size 16; inputs q, past keys, new keys, mask, past values, new
/// values; outputs the attention and the grown keys and values.
fn layer_with_cache() -> TypedModel {
    let mut model = TypedModel::default();
    let s = model.symbols.sym("S");
    let p = model.symbols.sym("P");
    let positions = TDim::from(s.clone());
    let keys = TDim::from(p.clone()) + TDim::from(s.clone());
    let q = model.add_source("q", f32::fact(dims![1, 2, 4, positions.clone(), 16])).unwrap();
    let past_k = model.add_source("past_k", f32::fact(dims![1, 2, p.clone(), 16])).unwrap();
    let new_k = model.add_source("new_k", f32::fact(dims![1, 2, s.clone(), 16])).unwrap();
    let mask = model.add_source("mask", f32::fact(dims![1, 1, positions, keys])).unwrap();
    let past_v = model.add_source("past_v", f32::fact(dims![1, 2, p, 16])).unwrap();
    let new_v = model.add_source("new_v", f32::fact(dims![1, 2, s, 16])).unwrap();
    let k = model.wire_node("k_concat", TypedConcat::new(2), &[past_k, new_k]).unwrap()[0];
    let v = model.wire_node("v_concat", TypedConcat::new(2), &[past_v, new_v]).unwrap()[0];
    let einsum = |spec: &str| EinSum::new(spec.parse().unwrap(), f32::datum_type());
    let scores = model.wire_node("qk", einsum("abcmk,abnk->bcmn"), &[q, k]).unwrap()[0];
    let softmax = ScaledMaskedSoftmax { scale: Arc::new(tensor0(0.25f32)), post_softmax_mask: false };
    let probs = model.wire_node("softmax", softmax, &[scores, mask]).unwrap()[0];
    let y = model.wire_node("pv", einsum("bcmn,abnk->bcmk"), &[probs, v]).unwrap()[0];
    model.select_output_outlets(&[y, k, v]).unwrap();
    model
}

fn engine_ops(model: &mut TypedModel) -> usize {
    use_masked_softmax(model).unwrap();
    use_activation_products(model).unwrap();
    assert_eq!(use_attention(model).unwrap(), 1);
    use_kv_append(model, 4096).unwrap()
}

/// A causal float mask for `positions` new positions after `past` cached ones.
fn causal(positions: usize, past: usize) -> Tensor {
    let keys = past + positions;
    let values: Vec<f32> = (0..positions * keys).map(|i| if i % keys <= past + i / keys { 0.0 } else { f32::NEG_INFINITY }).collect();
    Tensor::from_shape(&[1, 1, positions, keys], &values).unwrap()
}

#[test]
fn a_layer_decodes_the_same_with_its_cache_appended_in_place() {
    let mut rng = ChaCha8Rng::seed_from_u64(37);
    let mut fused = layer_with_cache();
    assert_eq!(engine_ops(&mut fused), 2);
    assert!(!fused.nodes().iter().any(|n| n.op_is::<TypedConcat>()));
    let mut chain = layer_with_cache();
    use_masked_softmax(&mut chain).unwrap();
    use_activation_products(&mut chain).unwrap();
    use_attention(&mut chain).unwrap();
    let plan = |m: TypedModel| m.into_optimized().unwrap().into_runnable().unwrap().spawn().unwrap();
    let (mut fused, mut chain) = (plan(fused), plan(chain));
    let empty = || Tensor::zero::<f32>(&[1, 2, 0, 16]).unwrap().into_tvalue();
    let (mut fused_kv, mut chain_kv) = ((empty(), empty()), (empty(), empty()));
    // A prompt of 9 positions, then 80 decode steps: past the first room, so the cache moves.
    let mut past = 0;
    for positions in [9].into_iter().chain([1; 80]) {
        let (q, k, v) = (random(&mut rng, &[1, 2, 4, positions, 16]), random(&mut rng, &[1, 2, positions, 16]), random(&mut rng, &[1, 2, positions, 16]));
        let mask = causal(positions, past).into_tvalue();
        let inputs = |kv: (TValue, TValue)| tvec![q.clone().into_tvalue(), kv.0, k.clone().into_tvalue(), mask.clone(), kv.1, v.clone().into_tvalue()];
        let mut got = fused.run(inputs(fused_kv)).unwrap();
        let mut want = chain.run(inputs(chain_kv)).unwrap();
        assert!(Heads::is_rows(&got[1]) && Heads::is_rows(&got[2]));
        assert_eq!(got[0].to_plain_array_view::<f32>().unwrap(), want[0].to_plain_array_view::<f32>().unwrap(), "after {past} positions");
        assert_eq!(plain(&got[1]), plain(&want[1]));
        fused_kv = (got.remove(1), got.remove(1));
        chain_kv = (want.remove(1), want.remove(1));
        past += positions;
    }
}

#[test]
fn a_cache_another_op_reads_stays_on_the_concat() {
    let mut model = layer_with_cache();
    // The keys also feed a tract op (a debugging export's norm, say), which reads plain tensors.
    let k = model.node_by_name("k_concat").unwrap().id;
    let sum = model.wire_node("k_sum", tract_onnx::tract_core::ops::nn::Reduce::new(tvec!(3), tract_onnx::tract_core::ops::nn::Reducer::Sum), &[k.into()]).unwrap()[0];
    let mut outputs = model.output_outlets().unwrap().to_vec();
    outputs.push(sum);
    model.select_output_outlets(&outputs).unwrap();
    assert_eq!(engine_ops(&mut model), 1, "only the values' concat is replaced");
    assert!(model.node(model.node_by_name("k_concat").unwrap().id).op_is::<TypedConcat>());
}

/// A [`KvRows`] cache of `len` random positions (room for `len + MIN_ROOM`).
fn rows_cache(rng: &mut ChaCha8Rng, heads: usize, len: usize) -> TValue {
    append(&KvAppend { limit: 4096 }, Tensor::zero::<f32>(&[1, heads, 0, 4]).unwrap().into_tvalue(), &random(rng, &[1, heads, len, 4]))
}

#[test]
fn a_session_starting_over_keeps_its_own_rows_and_never_writes_a_shared_cache() {
    let mut rng = ChaCha8Rng::seed_from_u64(38);
    let shared = random(&mut rng, &[1, 2, 30, 4]).into_tvalue();
    let want = plain(&shared.slice(2, 0, 20).unwrap());
    // The session's own cache, with room: refilled in place.
    let own = rows_cache(&mut rng, 2, 40);
    let at = address(&own);
    let got = restarted(own, Some(&shared), 20, 4096).unwrap();
    assert_eq!((got.shape(), address(&got)), (&[1, 2, 20, 4][..], at));
    assert_eq!(plain(&got), want);
    // Emptied in place for a cold prompt, then grown again in place.
    let got = restarted(got, None, 0, 4096).unwrap();
    assert_eq!((got.shape(), address(&got)), (&[1, 2, 0, 4][..], at));
    let got = append(&KvAppend { limit: 4096 }, got, &shared);
    assert_eq!((plain(&got), address(&got)), (plain(&shared), at));
    // Held by a prefix cache too: left as it was; the session takes another prefix whole,
    // shared until its first pass copies it.
    let held = got.clone();
    let before = plain(&held);
    let other = rows_cache(&mut rng, 2, 9);
    let taken = restarted(got, Some(&other), 9, 4096).unwrap();
    assert!(Arc::ptr_eq(taken.as_arc_tensor().unwrap(), other.as_arc_tensor().unwrap()));
    assert_eq!(plain(&held), before);
    // Too little room: a new cache with room.
    let small = rows_cache(&mut rng, 2, 3);
    let got = restarted(small, Some(&shared), 30 + MIN_ROOM, 4096);
    assert!(got.is_err(), "30 positions cannot give {}", 30 + MIN_ROOM);
    let got = restarted(rows_cache(&mut rng, 2, 3), Some(&shared), 30, 4096).unwrap();
    assert_eq!(plain(&got), plain(&shared));
}

#[test]
fn a_plain_cache_starts_over_as_the_concat_needs_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(39);
    let shared = random(&mut rng, &[1, 2, 5, 4]).into_tvalue();
    let own = random(&mut rng, &[1, 2, 8, 4]).into_tvalue();
    let whole = restarted(own.clone(), Some(&shared), 5, 4096).unwrap();
    assert!(Arc::ptr_eq(whole.as_arc_tensor().unwrap(), shared.as_arc_tensor().unwrap()), "the whole of a cache is shared, not copied");
    let part = restarted(own.clone(), Some(&shared), 3, 4096).unwrap();
    assert!(!Heads::is_rows(&part));
    assert_eq!(plain(&part), plain(&shared.slice(2, 0, 3).unwrap()));
    let empty = restarted(own, None, 0, 4096).unwrap();
    assert_eq!(empty.shape(), &[1, 2, 0, 4]);
}
