//! Matrix products of 4-bit weights with 8-bit activations ("W4A8"), the way llama.cpp runs
//! Q4_0 and onnxruntime runs MatMulNBits at `accuracy_level = 4`.
//!
//! Contract (what a 4-bit model file means to every runtime that runs it, checked against
//! onnxruntime in tests/numerics.rs): the weight is Q4_0 — blocks of 32 inputs per output, each
//! a scale `sw` and 32 codes, weight = `(code − 8) · sw`. Each row of the activation is cut into
//! the same blocks of 32 and quantized symmetrically: `sa = max|x| / 127`,
//! `q = round_half_even(x · (1 / sa))` (0 when the block is all zeros). Then
//! `y = Σ_blocks sw · sa · Σ_i (code_i − 8) · q_i`, the inner sum exact in integers. Only the
//! order of the float additions over blocks is the kernel's.
//!
//! Why: tract 0.23.9 dequantizes Q4_0 to float inside its matmul, and on x86 it has only a
//! one-column kernel for it, so 4-bit decode and prompts ran slower than float32 (the profile
//! in bench/RESULTS.md). Integer dot products read the 4-bit codes directly: 32 products per
//! instruction on AVX2 (`vpmaddubsw`), `vpdpbusd` on AVX-VNNI, `sdot` on aarch64.

#[cfg(target_arch = "aarch64")]
mod arm;
mod op;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use op::use_w4a8_products;

use tract_onnx::prelude::f16;

/// Inputs per quantization block, for weights and activations alike.
pub const BLOCK: usize = 32;

/// A Q4_0 weight of `n` outputs × `k` inputs, laid out for the kernels.
pub struct Weights {
    pub n: usize,
    pub k: usize,
    /// `n × k/32` blocks of 16 bytes, row-major. In each block, byte `j` holds code `j` in its
    /// low nibble and code `j + 16` in its high nibble (GGML's order: one shift splits a block
    /// into its two halves).
    codes: Vec<u8>,
    /// One scale per block, row-major `[n, k/32]`.
    scales: Vec<f32>,
}

/// An activation of `m` rows quantized per block to int8 (see the module contract).
pub struct QuantizedRows {
    m: usize,
    k: usize,
    values: Vec<i8>,
    /// `[m, k/32]`.
    scales: Vec<f32>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4_0 {} × {}", self.n, self.k)
    }
}

impl Weights {
    /// Builds weights from Q4_0 blocks as GGML and tract store them: per block a little-endian
    /// float16 scale then 16 bytes of codes.
    pub fn from_q4_0_blocks(bytes: &[u8], n: usize, k: usize) -> Result<Self, String> {
        const BLOCK_BYTES: usize = 2 + BLOCK / 2;
        if k % BLOCK != 0 || n == 0 {
            return Err(format!("a Q4_0 weight needs inputs in multiples of {BLOCK} and at least one output, got {n} × {k}"));
        }
        let blocks = n * (k / BLOCK);
        if bytes.len() != blocks * BLOCK_BYTES {
            return Err(format!("a {n} × {k} Q4_0 weight is {} bytes, found {}", blocks * BLOCK_BYTES, bytes.len()));
        }
        let mut codes = Vec::with_capacity(blocks * BLOCK / 2);
        let mut scales = Vec::with_capacity(blocks);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            scales.push(f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32());
            codes.extend_from_slice(&block[2..]);
        }
        Ok(Self { n, k, codes, scales })
    }

    /// `out[r, j] = Σ_k W[j, k] · a[r, k]` under the module contract, for `a` of `m` rows of `k`
    /// (row-major) and `out` of `m` rows of `n`.
    pub fn matmul(&self, a: &[f32], m: usize, out: &mut [f32]) {
        let rows = QuantizedRows::new(a, m, self.k);
        self.matmul_quantized(&rows, out);
    }

    /// [`Weights::matmul`] on an activation already quantized.
    pub fn matmul_quantized(&self, a: &QuantizedRows, out: &mut [f32]) {
        assert_eq!(a.k, self.k, "activation width must match the weight's inputs");
        assert_eq!(out.len(), a.m * self.n, "output must hold m × n values");
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: available() checked that this CPU has AVX2 and FMA.
            unsafe { x86::matmul(self, a, out) };
            return;
        }
        #[cfg(target_arch = "aarch64")]
        return arm::matmul(self, a, out);
        #[allow(unreachable_code)]
        portable::matmul(self, a, out);
    }

    fn row_codes(&self, row: usize) -> &[u8] {
        let len = self.k / 2;
        &self.codes[row * len..][..len]
    }

    fn row_scales(&self, row: usize) -> &[f32] {
        let len = self.k / BLOCK;
        &self.scales[row * len..][..len]
    }
}

impl QuantizedRows {
    /// Quantizes `m` rows of `k` floats (row-major), `k` a multiple of [`BLOCK`].
    pub fn new(a: &[f32], m: usize, k: usize) -> Self {
        assert!(k % BLOCK == 0 && a.len() == m * k, "activation must be m × k with k a multiple of {BLOCK}");
        let mut values = vec![0i8; a.len()];
        let mut scales = vec![0f32; a.len() / BLOCK];
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: available() checked that this CPU has AVX2 and FMA.
            unsafe { x86::quantize(a, &mut values, &mut scales) };
            return Self { m, k, values, scales };
        }
        #[cfg(target_arch = "aarch64")]
        arm::quantize(a, &mut values, &mut scales);
        #[cfg(not(target_arch = "aarch64"))]
        portable::quantize(a, &mut values, &mut scales);
        Self { m, k, values, scales }
    }

    fn row(&self, r: usize) -> (&[i8], &[f32]) {
        (&self.values[r * self.k..][..self.k], &self.scales[r * (self.k / BLOCK)..][..self.k / BLOCK])
    }
}

#[cfg(test)]
mod tests;
