//! The quantized-product contract in plain Rust: the reference the vector kernels are tested against, and
//! what runs where no vector kernel exists (LLVM vectorizes the integer dot on its own).

use super::{Bits, OutputShare, QuantizedRows, Weights, BLOCK};

/// Quantizes blocks of 32 floats to int8 with one scale each (see the module contract).
pub fn quantize(a: &[f32], values: &mut [i8], scales: &mut [f32]) {
    for ((block, q), scale) in a.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)).zip(scales) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        // The same operations, in the same order, as onnxruntime's int8 path: a scale computed
        // another way (amax · (1/127)) can differ in the last bit and move a code that sits on
        // a rounding edge.
        *scale = amax / 127.0;
        let inverse = if *scale != 0.0 { 1.0 / *scale } else { 0.0 };
        for (q, x) in q.iter_mut().zip(block) {
            // `as` saturates, and turns NaN into 0.
            *q = (x * inverse).round_ties_even() as i8;
        }
    }
}

pub fn matmul(w: &Weights, a: &QuantizedRows, out: OutputShare) {
    let mut unpacked = [0i8; BLOCK];
    let block_bytes = w.bits.block_bytes();
    for j in out.cols() {
        let (codes, w_scales) = (w.row_codes(j), w.row_scales(j));
        for r in 0..a.m {
            let (q, a_scales) = a.row(r);
            let mut acc = 0f32;
            for b in 0..w_scales.len() {
                unpack(w.bits, &codes[b * block_bytes..][..block_bytes], &mut unpacked);
                let dot: i32 = unpacked.iter().zip(&q[b * BLOCK..][..BLOCK]).map(|(&w, &x)| w as i32 * x as i32).sum();
                acc += dot as f32 * (w_scales[b] * a_scales[b]);
            }
            out.set(r, j, acc);
        }
    }
}

/// One block's code bytes to its 32 signed weights (code − offset), in input order.
fn unpack(bits: Bits, bytes: &[u8], out: &mut [i8; BLOCK]) {
    match bits {
        Bits::Four => {
            for (i, &byte) in bytes.iter().enumerate() {
                out[i] = (byte & 0x0f) as i8 - 8;
                out[i + BLOCK / 2] = (byte >> 4) as i8 - 8;
            }
        }
        Bits::Eight => {
            for (w, &byte) in out.iter_mut().zip(bytes) {
                *w = (byte ^ 0x80) as i8;
            }
        }
    }
}
