use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::engine::ops::shares::PARALLEL_PRODUCT;

/// A random weight in tract's block bytes for `bits` (Q4_0, or Q8_1 at 8 bits), and the float
/// weight it stands for. 8-bit codes cover their whole range, −128 included.
fn random_weight(rng: &mut ChaCha8Rng, bits: Bits, n: usize, k: usize) -> (Vec<u8>, Vec<f64>) {
    let mut bytes = Vec::new();
    let mut dense = vec![0f64; n * k];
    for j in 0..n {
        for b in 0..k / BLOCK {
            let scale = f16::from_f32(rng.random_range(0.001f32..0.1));
            bytes.extend_from_slice(&scale.to_bits().to_le_bytes());
            let at = j * k + b * BLOCK;
            match bits {
                Bits::Four => {
                    for i in 0..BLOCK / 2 {
                        let (lo, hi) = (rng.random_range(0u8..16), rng.random_range(0u8..16));
                        bytes.push(lo | (hi << 4));
                        dense[at + i] = (lo as f64 - 8.0) * scale.to_f64();
                        dense[at + i + BLOCK / 2] = (hi as f64 - 8.0) * scale.to_f64();
                    }
                }
                Bits::Eight => {
                    // The sum tract keeps beside the scale; the kernels must not need it.
                    bytes.extend_from_slice(&f16::from_f32(f32::NAN).to_bits().to_le_bytes());
                    for i in 0..BLOCK {
                        let q = if i == 0 && b == 0 { -128i8 } else { rng.random_range(-128i16..128) as i8 };
                        bytes.push(q as u8);
                        dense[at + i] = q as f64 * scale.to_f64();
                    }
                }
            }
        }
    }
    (bytes, dense)
}

fn from_blocks(bits: Bits, bytes: &[u8], n: usize, k: usize) -> Result<Weights, String> {
    match bits {
        Bits::Four => Weights::from_q4_0_blocks(bytes, n, k),
        Bits::Eight => Weights::from_q8_1_blocks(bytes, n, k),
    }
}

fn random_activation(rng: &mut ChaCha8Rng, m: usize, k: usize) -> Vec<f32> {
    let mut a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
    // Blocks of very different magnitude, an all-zero block, and values on rounding edges.
    a[..BLOCK].iter_mut().for_each(|x| *x *= 40.0);
    a[BLOCK..2 * BLOCK].iter_mut().for_each(|x| *x = 0.0);
    if a.len() >= 3 * BLOCK {
        let block = &mut a[2 * BLOCK..3 * BLOCK];
        block[0] = 127.0;
        block[1] = 2.5;
        block[2] = -3.5;
        block[3] = 0.5;
    }
    a
}

/// The contract computed the slow way: dequantized weight against dequantized activation.
fn contract(dense: &[f64], a: &QuantizedRows, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; a.m * n];
    for r in 0..a.m {
        let (q, scales) = a.row(r);
        for j in 0..n {
            out[r * n + j] = (0..a.k).map(|i| dense[j * a.k + i] * q[i] as f64 * scales[i / BLOCK] as f64).sum();
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5 * scale, "{what}: element {i} is {g}, the contract gives {w}");
    }
}

#[test]
fn quantized_activations_follow_the_contract() {
    let mut a = vec![0.0f32; 3 * BLOCK];
    a[BLOCK..2 * BLOCK].iter_mut().enumerate().for_each(|(i, x)| *x = i as f32 - 16.0);
    // Largest magnitude 127: scale 1, so rounding shows directly; ties go to even.
    a[2 * BLOCK..2 * BLOCK + 6].copy_from_slice(&[-127.0, 2.5, 3.5, -2.5, 0.5, 1.49]);
    let rows = QuantizedRows::new(&a, 1, 3 * BLOCK);
    let (q, scales) = rows.row(0);
    assert_eq!(scales, &[0.0, 16.0 / 127.0, 1.0]);
    assert!(q[..BLOCK].iter().all(|&v| v == 0), "an all-zero block quantizes to zeros");
    assert_eq!((q[BLOCK], q[BLOCK + 16]), (-127, 0), "the largest magnitude maps to ±127");
    assert_eq!(&q[2 * BLOCK..2 * BLOCK + 6], &[-127, 2, 4, -2, 0, 1]);
}

#[test]
fn products_match_the_contract_for_every_tile_shape() {
    for bits in [Bits::Four, Bits::Eight] {
        products_match_the_contract(bits);
    }
}

fn products_match_the_contract(bits: Bits) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    // m = 1 (decode), 5 (a tile of 4 activation rows and one left over); n = 7 leaves weight
    // rows outside full tiles.
    for (m, n, k) in [(1, 8, 64), (1, 7, 96), (5, 7, 64), (9, 16, 128), (4, 24, 32), (2, 12, 64), (17, 16, 64), (1, 32, 64), (11, 48, 96)] {
        let (bytes, dense) = random_weight(&mut rng, bits, n, k);
        let w = Weights::with_layout(bits, &bytes, n, k, Layout::Rows).unwrap();
        let a = random_activation(&mut rng, m, k);
        let want = contract(&dense, &QuantizedRows::new(&a, m, k), n);
        let shape = format!("{bits:?}-bit codes, {m}×{k} · {n}×{k}");
        let mut got = vec![f32::NAN; m * n];
        w.matmul(&a, m, &mut got);
        assert_close(&got, &want, &format!("dispatched kernel, {shape}"));
        for (name, kernel) in kernels() {
            let mut out = vec![f32::NAN; m * n];
            // SAFETY: kernels() lists only what this CPU runs.
            unsafe { kernel(&w, &QuantizedRows::new(&a, m, k), OutputShare::whole(&mut out, n)) };
            assert_close(&out, &want, &format!("{name} kernel, {shape}"));
        }
        for layout in [Layout::Rows16, Layout::Rows8, Layout::Rows4] {
            match Weights::with_layout(bits, &bytes, n, k, layout) {
                Ok(side_by_side) => {
                    for (name, kernel) in side_by_side_kernels(layout, bits) {
                        let mut out = vec![f32::NAN; m * n];
                        // SAFETY: side_by_side_kernels lists only what this CPU runs.
                        unsafe { kernel(&side_by_side, &QuantizedRows::new(&a, m, k), OutputShare::whole(&mut out, n)) };
                        assert_close(&out, &want, &format!("{name} kernel, {shape}"));
                    }
                }
                Err(e) => assert!(!(layout_expected(layout, bits) && n % layout.group() == 0), "{e}"),
            }
        }
        let fastest = [Layout::Rows16, Layout::Rows8, Layout::Rows4].into_iter().find(|l| layout_expected(*l, bits) && n % l.group() == 0);
        assert_eq!(from_blocks(bits, &bytes, n, k).unwrap().layout, fastest.unwrap_or(Layout::Rows), "the layout this CPU reads fastest");
    }
}

/// Every kernel for a side-by-side layout this CPU runs on codes of this width.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn side_by_side_kernels(layout: Layout, bits: Bits) -> Vec<(&'static str, Kernel)> {
    let mut kernels: Vec<(&'static str, Kernel)> = vec![];
    #[cfg(target_arch = "x86_64")]
    if layout == Layout::Rows16 {
        kernels.push(("rows16 avx512-vnni", x86::rows16::matmul));
    }
    #[cfg(target_arch = "x86_64")]
    if layout == Layout::Rows8 {
        if bits == Bits::Four {
            kernels.push(("rows8 avx2", x86::rows8::avx2::matmul));
        }
        if is_x86_feature_detected!("avxvnni") {
            kernels.push(("rows8 avx-vnni", x86::rows8::avx_vnni::matmul));
        }
        if x86::rows8::has_avx512_vnni() {
            kernels.push(("rows8 avx512-vnni", x86::rows8::avx512::matmul));
        }
    }
    #[cfg(target_arch = "aarch64")]
    if layout == Layout::Rows4 {
        kernels.push(("rows4 sdot", arm::rows4::matmul));
    }
    kernels
}

/// Whether this machine must run `layout`'s kernel for codes of this width (asked
/// independently of `runs_here`).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn layout_expected(layout: Layout, bits: Bits) -> bool {
    match layout {
        #[cfg(target_arch = "x86_64")]
        Layout::Rows16 => {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(target_arch = "x86_64")]
        Layout::Rows8 => {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && (is_x86_feature_detected!("avxvnni") || bits == Bits::Four)
        }
        #[cfg(target_arch = "aarch64")]
        Layout::Rows4 => std::arch::is_aarch64_feature_detected!("dotprod"),
        _ => false,
    }
}

type Kernel = unsafe fn(&Weights, &QuantizedRows, OutputShare);

/// Every kernel this CPU can run. On CI's x86 machines that must include both vector ones.
fn kernels() -> Vec<(&'static str, Kernel)> {
    let mut kernels: Vec<(&'static str, Kernel)> = vec![("portable", |w, a, out| portable::matmul(w, a, out))];
    #[cfg(target_arch = "x86_64")]
    {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        assert!(x86::available() || !ci, "CI machines must run the AVX2 kernel");
        if x86::available() {
            kernels.push(("avx2", x86::avx2::matmul));
        }
        if x86::available() && x86::has_vnni() {
            kernels.push(("avx-vnni", x86::vnni::matmul));
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        kernels.push(("neon", arm::neon::matmul));
        if arm::has_dotprod() {
            kernels.push(("dotprod", arm::dotprod::matmul));
        }
    }
    kernels
}

#[test]
fn vector_quantization_is_bit_identical_to_the_portable_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let a = random_activation(&mut rng, 3, 4 * BLOCK);
    let (mut want, mut want_scales) = (vec![0i8; a.len()], vec![0f32; a.len() / BLOCK]);
    portable::quantize(&a, &mut want, &mut want_scales);
    // QuantizedRows::new takes the vector path where there is one.
    let rows = QuantizedRows::new(&a, 3, 4 * BLOCK);
    assert_eq!(rows.scales, want_scales);
    assert_eq!(rows.values, want);
}

#[test]
fn weights_of_the_wrong_size_are_refused() {
    let err = Weights::from_q4_0_blocks(&[0u8; 17], 1, 32).unwrap_err();
    assert!(err.contains("18 bytes, found 17"), "{err}");
    let err = Weights::from_q4_0_blocks(&[0u8; 18], 1, 30).unwrap_err();
    assert!(err.contains("multiples of 32"), "{err}");
    let err = Weights::from_q8_1_blocks(&[0u8; 34], 1, 32).unwrap_err();
    assert!(err.contains("Q8_1 weight is 36 bytes, found 34"), "{err}");
}

#[test]
fn products_split_over_threads_equal_the_single_threaded_ones() {
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Large enough to be split: m · n · k ≥ PARALLEL_PRODUCT.
    let (n, k) = (1032, 1024);
    for bits in [Bits::Four, Bits::Eight] {
        let (bytes, _) = random_weight(&mut rng, bits, n, k);
        let w = from_blocks(bits, &bytes, n, k).unwrap();
        for m in [1, 5] {
            assert!(m * n * k >= PARALLEL_PRODUCT);
            let a = random_activation(&mut rng, m, k);
            let mut single = vec![f32::NAN; m * n];
            w.matmul(&a, m, &mut single);
            // Many products in a row, as a decode step runs them: helpers awake, asleep, woken.
            let pool = Executor::multithread(3);
            for round in 0..50 {
                let mut split = vec![f32::NAN; m * n];
                multithread_tract_scope(pool.clone(), || w.matmul(&a, m, &mut split));
                assert_eq!(single, split, "{bits:?}-bit codes, m = {m}, round {round}");
                if round == 25 {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
}

/// Weights written as a plan-cache record and read back compute the same bits, in every
/// layout this CPU runs (Rows4 under qemu's Cortex-A76 in CI), with and without Q4_1 offsets;
/// a record cut short or read as a float32 weight is refused.
#[test]
fn stored_weights_read_back_to_the_same_products() {
    use crate::engine::ops::f32_products::PanelWeights;
    use crate::engine::ops::stored::{RecordReader, RecordWriter, StoredWeights};
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (m, n, k) = (3, 48, 96);
    let a = random_activation(&mut rng, m, k);
    let file = tempfile::tempfile().unwrap();
    // SAFETY: the test's own temporary file, not changed while mapped.
    let map = |file: &std::fs::File| std::sync::Arc::new(unsafe { memmap2::Mmap::map(file) }.unwrap());
    for bits in [Bits::Four, Bits::Eight] {
        let (bytes, _) = random_weight(&mut rng, bits, n, k);
        for layout in [Layout::Rows, Layout::Rows16, Layout::Rows8, Layout::Rows4] {
            let Ok(w) = Weights::with_layout(bits, &bytes, n, k, layout) else { continue };
            let offsets: Vec<f32> = (0..n * k / BLOCK).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let with_offsets = Weights::with_layout(bits, &bytes, n, k, layout).unwrap().with_offsets(BlockOffsets::new(&offsets, n, k).unwrap()).unwrap();
            for w in [w, with_offsets] {
                file.set_len(0).unwrap();
                std::io::Seek::rewind(&mut &file).unwrap();
                let mut out = RecordWriter::new(std::io::BufWriter::new(&file));
                w.store(&mut out).unwrap();
                let len = out.position();
                drop(out);
                let map = map(&file);
                let back = Weights::restore(&mut RecordReader::new(&map, 0, len)).unwrap();
                assert!(back.codes.is_mapped(), "the codes stay the map's pages");
                assert_eq!((back.layout, back.bits, back.offsets.is_some()), (w.layout, w.bits, w.offsets.is_some()));
                let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
                w.matmul(&a, m, &mut want);
                back.matmul(&a, m, &mut got);
                assert_eq!(want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{w:?} in {layout:?}");
                let cut = Weights::restore(&mut RecordReader::new(&map, 0, len - 1)).map(|_| ());
                assert!(cut.is_err(), "a record one byte short must be refused");
                assert!(PanelWeights::restore(&mut RecordReader::new(&map, 0, len)).is_err(), "quantized codes are not float32 panels");
            }
        }
    }
}
