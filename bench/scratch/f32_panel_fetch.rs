//! Scratch copy of the AVX2 float32 prompt kernel (`daemon/src/engine/ops/f32_products.rs`),
//! to compare ways of fetching the next panel of weights while one panel computes. Weights
//! come from memory (256 MB of copies), 1 thread, best of 9 interleaved rounds, GFLOPS and
//! the ratio to `cur`. Not part of any build:
//!
//!     rustc -O bench/scratch/f32_panel_fetch.rs -o /tmp/f32-fetch
//!     for s in "21 512 512" "21 1408 512" "40 576 576" "1 512 512"; do /tmp/f32-fetch $s; done
//!
//! Arguments: rows m, outputs n, inputs k. Variants: `cur` the whole next panel into L1 during
//! the first tile (the engine before 2026-12-04); `nopf` no hints; `bal` tiles of even sizes;
//! `spT0`/`spT1` every pass asks for an even share of the next panel's lines, into L1 / L2
//! (the engine since); `bal…` both. Tile sizes 6, then 4, then the rest (as the engine). The
//! AVX-512 figures in bench/RESULTS.md came from a copy with tiles of 12 (`sizes` and a 12-row
//! arm in `run`, features `avx512f,fma`); its `bal` variants are not meaningful. For m = 1 (a
//! decode step) the engine asks for nothing, before and since: that is `nopf`.

use std::arch::x86_64::*;
const PANEL: usize = 16;
// HINT: 0 none, 1 = T0 whole next panel in this tile, 2 = spread T0 (every `every` step, phase), 3 = spread T1
#[inline(always)]
fn tile<const T: usize, const HINT: u8>(panel: &[f32], next: *const f32, a: &[f32], k: usize, r0: usize, every: usize, phase: usize) -> [[f32; PANEL]; T] {
    let rows: [&[f32]; T] = std::array::from_fn(|t| &a[(r0 + t) * k..][..k]);
    let mut acc = [[0f32; PANEL]; T];
    let mut c = phase;
    for (i, weights) in panel.chunks_exact(PANEL).enumerate() {
        match HINT {
            1 => unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i * PANEL).cast()) },
            2 | 3 => { if c == 0 { if HINT == 2 { unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i * PANEL).cast()) } } else { unsafe { _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(i * PANEL).cast()) } }; c = every; } c -= 1; }
            _ => {}
        }
        for t in 0..T {
            let x = rows[t][i];
            for (s, w) in acc[t].iter_mut().zip(weights) { *s = w.mul_add(x, *s); }
        }
    }
    acc
}
#[inline(always)]
fn row<const HINT: u8>(panel: &[f32], x: &[f32], next: *const f32, every: usize, phase: usize) -> [f32; PANEL] {
    const U: usize = 4;
    let mut acc = [[0f32; PANEL]; U];
    let whole = x.len() / U * U;
    let mut c = phase;
    for (q, (weights, xs)) in panel.chunks_exact(U * PANEL).zip(x[..whole].chunks_exact(U)).enumerate() {
        for u in 0..U { let i = q * U + u; match HINT {
            1 => unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i * PANEL).cast()) },
            2 | 3 => { if c == 0 { if HINT == 2 { unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i * PANEL).cast()) } } else { unsafe { _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(i * PANEL).cast()) } }; c = every; } c -= 1; }
            _ => {} } }
        for u in 0..U { for (s, w) in acc[u].iter_mut().zip(&weights[u * PANEL..][..PANEL]) { *s = w.mul_add(xs[u], *s); } }
    }
    std::array::from_fn(|j| (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]))
}
fn wt<const T: usize>(out: &mut [f32], n: usize, r0: usize, j0: usize, s: &[[f32;PANEL];T]) { for t in 0..T { out[(r0+t)*n+j0..][..PANEL].copy_from_slice(&s[t]); } }
#[inline(always)]
fn run<const HINT: u8>(size: usize, panel: &[f32], next: *const f32, a: &[f32], k: usize, r: usize, every: usize, phase: usize, out: &mut [f32], n: usize, j0: usize) {
    match size {
        6 => wt(out,n,r,j0,&tile::<6,HINT>(panel,next,a,k,r,every,phase)),
        5 => wt(out,n,r,j0,&tile::<5,HINT>(panel,next,a,k,r,every,phase)),
        4 => wt(out,n,r,j0,&tile::<4,HINT>(panel,next,a,k,r,every,phase)),
        3 => wt(out,n,r,j0,&tile::<3,HINT>(panel,next,a,k,r,every,phase)),
        2 => wt(out,n,r,j0,&tile::<2,HINT>(panel,next,a,k,r,every,phase)),
        _ => { let s=[row::<HINT>(panel,&a[r*k..][..k],next,every,phase)]; wt(out,n,r,j0,&s) }
    }
}
/// tile sizes: cur = 6s then 4s then rest; bal = even sizes
fn sizes(m: usize, bal: bool) -> Vec<usize> {
    let mut v = vec![];
    if bal {
        let t = m.div_ceil(6); let base = m / t; let extra = m % t;
        for j in 0..t { v.push(base + usize::from(j < extra)); }
    } else {
        let mut r = 0; while m - r >= 6 { v.push(6); r += 6; } while m - r >= 4 { v.push(4); r += 4; } if m > r { v.push(m - r); }
    }
    v
}
#[inline(always)]
fn panels<const MODE: u8>(w: &[f32], n: usize, k: usize, a: &[f32], _m: usize, out: &mut [f32], sz: &[usize]) {
    let np = n / PANEL;
    let t = sz.len();
    for p in 0..np {
        let panel = &w[p*k*PANEL..][..k*PANEL];
        let next = w[((p+1).min(np-1))*k*PANEL..].as_ptr();
        let j0 = p*PANEL; let mut r = 0;
        for (j, &s) in sz.iter().enumerate() {
            match MODE {
                1 => if j == 0 { run::<1>(s,panel,next,a,k,r,1,0,out,n,j0) } else { run::<0>(s,panel,next,a,k,r,1,0,out,n,j0) },
                2 => run::<2>(s,panel,next,a,k,r,t,j,out,n,j0),
                3 => run::<3>(s,panel,next,a,k,r,t,j,out,n,j0),
                _ => run::<0>(s,panel,next,a,k,r,1,0,out,n,j0),
            }
            r += s;
        }
    }
}
#[target_feature(enable = "avx2,fma")] #[inline(never)] unsafe fn m0(w:&[f32],n:usize,k:usize,a:&[f32],m:usize,o:&mut [f32],s:&[usize]) { panels::<0>(w,n,k,a,m,o,s) }
#[target_feature(enable = "avx2,fma")] #[inline(never)] unsafe fn m1(w:&[f32],n:usize,k:usize,a:&[f32],m:usize,o:&mut [f32],s:&[usize]) { panels::<1>(w,n,k,a,m,o,s) }
#[target_feature(enable = "avx2,fma")] #[inline(never)] unsafe fn m2(w:&[f32],n:usize,k:usize,a:&[f32],m:usize,o:&mut [f32],s:&[usize]) { panels::<2>(w,n,k,a,m,o,s) }
#[target_feature(enable = "avx2,fma")] #[inline(never)] unsafe fn m3(w:&[f32],n:usize,k:usize,a:&[f32],m:usize,o:&mut [f32],s:&[usize]) { panels::<3>(w,n,k,a,m,o,s) }
fn main(){
  let args: Vec<String> = std::env::args().collect();
  let m: usize = args[1].parse().unwrap(); let n: usize = args[2].parse().unwrap(); let k: usize = args[3].parse().unwrap();
  let copies = (256<<20) / (n*k*4) + 1;
  let ws: Vec<Vec<f32>> = (0..copies).map(|c| (0..n*k).map(|i| ((i*7+c) % 13) as f32 * 0.01).collect()).collect();
  let a: Vec<f32> = (0..m*k).map(|i| (i % 5) as f32 * 0.1).collect();
  let mut o = vec![0f32; m*n];
  type F = unsafe fn(&[f32],usize,usize,&[f32],usize,&mut [f32],&[usize]);
  let cur = sizes(m,false); let bal = sizes(m,true);
  let fs: Vec<(&str, F, &Vec<usize>)> = vec![("cur",m1,&cur),("nopf",m0,&cur),("bal",m1,&bal),("spT0",m2,&cur),("spT1",m3,&cur),("balspT1",m3,&bal),("balspT0",m2,&bal)];
  let mut best = vec![f64::MAX; fs.len()];
  let mut reference: Option<Vec<f32>> = None;
  for _round in 0..9 { for (f,(_,fun,sz)) in fs.iter().enumerate() {
     let t = std::time::Instant::now(); for w in &ws { unsafe { fun(w,n,k,&a,m,&mut o,sz) } } let d = t.elapsed().as_secs_f64()/copies as f64; best[f]=best[f].min(d);
     if sz == &&cur { if reference.is_none() { reference = Some(o.clone()); } else { assert!(reference.as_ref().unwrap() == &o); } }
  } }
  let fl = 2.0*(m*n*k) as f64;
  for (f,(name,_,_)) in fs.iter().enumerate() { print!("{name} {:.1} ({:.2}x) ", fl/best[f]/1e9, best[0]/best[f]); }
  println!("m={m} n={n} k={k} cur={cur:?} bal={bal:?}");
}
