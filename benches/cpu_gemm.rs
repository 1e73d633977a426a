//! The CPU f32 GEMM at the TRM shapes: the project's `sgemm` against the
//! `gemm` crate, interleaved (each round runs both), best of the rounds in
//! GFLOP/s. The shapes are those of one D 512, S 916, batch 4 block (the
//! linears' forward, dx and dW products) and of the attention's per-head
//! products at a 256-query block.
//!
//! `cargo bench --bench cpu_gemm` (both thread counts);
//! `GEMM_THREADS=1|2`, `GEMM_ROUNDS` (default 5), `GEMM_ONLY=<name part>`.
//! Every product is also checked: the two results must agree.

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
fn main() {
    use trm::backend::cpu::sgemm::{available, sgemm, View};
    if !available() {
        eprintln!("cpu_gemm: this CPU has no AVX2+FMA; the project's sgemm does not run here");
        return;
    }
    let env = |k: &str| std::env::var(k).ok();
    // `cargo test --all-targets` runs this binary without `--bench`: one
    // pass over the small (attention) shapes, agreement checked, no timing
    // worth reading.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let rounds: usize = if smoke {
        1
    } else {
        env("GEMM_ROUNDS").and_then(|v| v.parse().ok()).unwrap_or(5)
    };
    let only = env("GEMM_ONLY").unwrap_or_default();
    let thread_counts: Vec<usize> = match env("GEMM_THREADS").and_then(|v| v.parse().ok()) {
        Some(t) => vec![t],
        None => vec![1, 2],
    };
    let m = 4 * 916;
    // name, m, n, k, A stored transposed (k x m), B stored as W (n x k)
    let shapes: [(&str, usize, usize, usize, bool, bool); 9] = [
        ("qkv  y = x W^T", m, 1536, 512, false, true),
        ("gate_up y = x W^T", m, 3072, 512, false, true),
        ("down y = x W^T", m, 512, 1536, false, true),
        ("down dx = dy W", m, 1536, 512, false, false),
        ("qkv dW = dy^T x", 1536, 512, m, true, false),
        ("attn S = Q K^T", 256, 916, 64, false, true),
        ("attn O = P V", 256, 64, 916, false, false),
        ("attn dV^T = dO^T P", 64, 916, 256, true, false),
        ("attn dQ = dS K", 256, 64, 916, false, false),
    ];
    let pool = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .expect("thread pool")
    };
    for &threads in &thread_counts {
        println!("cpu_gemm: {threads} thread(s), best of {rounds} rounds, GFLOP/s");
        let pool = pool(threads);
        for &(name, m, n, k, at, bw) in &shapes {
            if (!only.is_empty() && !name.contains(&only)) || (smoke && !name.starts_with("attn")) {
                continue;
            }
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let (a_rs, a_cs) = if at { (1, m as isize) } else { (k as isize, 1) };
            let (b_rs, b_cs) = if bw { (1, k as isize) } else { (n as isize, 1) };
            let mut c = [vec![0f32; m * n], vec![0f32; m * n]];
            let flop = 2.0 * (m * n * k) as f64;
            // Enough repetitions for ~50 ms per timing at 100 GFLOP/s.
            let reps = if smoke {
                1
            } else {
                (5e9 / flop).ceil().max(1.0) as usize
            };
            let mut best = [f64::MAX; 2];
            for _ in 0..rounds {
                for (v, out) in c.iter_mut().enumerate() {
                    let t = pool.install(|| {
                        let t = Instant::now();
                        for _ in 0..reps {
                            // SAFETY: the views cover a and b for these
                            // sizes and strides; out is a separate m x n buffer.
                            unsafe {
                                if v == 0 {
                                    let par = if threads > 1 {
                                        gemm::Parallelism::Rayon(threads)
                                    } else {
                                        gemm::Parallelism::None
                                    };
                                    gemm::gemm(
                                        m,
                                        n,
                                        k,
                                        out.as_mut_ptr(),
                                        1,
                                        n as isize,
                                        false,
                                        a.as_ptr(),
                                        a_cs,
                                        a_rs,
                                        b.as_ptr(),
                                        b_cs,
                                        b_rs,
                                        1.0,
                                        1.0,
                                        false,
                                        false,
                                        false,
                                        par,
                                    );
                                } else {
                                    let av = View {
                                        ptr: a.as_ptr(),
                                        rs: a_rs,
                                        cs: a_cs,
                                    };
                                    let bv = View {
                                        ptr: b.as_ptr(),
                                        rs: b_rs,
                                        cs: b_cs,
                                    };
                                    sgemm(
                                        m,
                                        n,
                                        k,
                                        out.as_mut_ptr(),
                                        n,
                                        av,
                                        bv,
                                        1.0,
                                        false,
                                        threads,
                                    );
                                }
                            }
                        }
                        t.elapsed().as_secs_f64() / reps as f64
                    });
                    best[v] = best[v].min(t);
                }
            }
            let diff = c[0]
                .iter()
                .zip(&c[1])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            // Entries are sums of k products of values in [-0.5, 0.5).
            assert!(
                diff <= 1e-6 * k as f32,
                "{name}: the two GEMMs disagree by {diff}"
            );
            println!(
                "  {name:<20} m {m:>4} n {n:>4} k {k:>4}   gemm crate {:6.1}   sgemm {:6.1}   (max |diff| {diff:.1e})",
                flop / best[0] / 1e9,
                flop / best[1] / 1e9
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("cpu_gemm: the project's sgemm is x86-64 only");
}

/// Deterministic values in [-0.5, 0.5).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}
