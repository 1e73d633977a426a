//! ACT-step timing of the CPU reference engine: one inner forward (all
//! H_cycles x (L_cycles + 1) L-calls, no tape) and one training step
//! (forward with tape + loss + backward), at the TRM shapes of the brief.
//! Run: `cargo bench --bench act_step` (env `BENCH_REPS` overrides repeats,
//! `BENCH_ONLY=a|b|c` picks a case, `BENCH_B=1|4` a batch of case a,
//! `BENCH_PARTS=fwd|step` one of the two measurements). Reports the median in ms.

use std::time::Instant;

use trm::backend::cpu::linear::gemm_isa;
use trm::model::config::{ArchConfig, PosEncodings};
use trm::model::trm::{act_step_train_in, broadcast_init, inner_forward, Batch, Ctx, Params};
use trm::model::weights::Weights;

fn config(d: usize, heads: usize, seq_len: usize, p: usize) -> ArchConfig {
    let mut c = ArchConfig::trm_default(seq_len, 12, 64);
    c.hidden_size = d;
    c.num_heads = heads;
    c.expansion = 4.0;
    c.l_layers = 2;
    c.h_cycles = 3;
    c.l_cycles = 4;
    c.puzzle_emb_ndim = d;
    c.puzzle_emb_len = p;
    c.pos_encodings = PosEncodings::Rope;
    c.forward_dtype = "float32".into();
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench_case(label: &str, cfg: &ArchConfig, b: usize, reps: usize) {
    let w = Weights::init(cfg, 1);
    let p = Params::<f32>::from_weights(cfg, &w).expect("params");
    let n = b * cfg.seq_len;
    let inputs: Vec<i32> = (0..n).map(|i| (i * 7 % 12) as i32).collect();
    let labels: Vec<i32> = (0..n)
        .map(|i| {
            if i % 5 == 0 {
                -100
            } else {
                (i * 3 % 12) as i32
            }
        })
        .collect();
    let pids: Vec<i32> = (0..b).map(|i| (i % 64) as i32).collect();
    let batch = Batch {
        inputs: &inputs,
        labels: &labels,
        puzzle_ids: &pids,
        b,
    };
    let ctx = Ctx::<f32>::new(cfg, b);
    let fwd = || {
        let zh = broadcast_init(&ctx.dm, &p.h_init);
        let zl = broadcast_init(&ctx.dm, &p.l_init);
        let t = Instant::now();
        let (out, _) = inner_forward(
            &ctx,
            cfg,
            &p,
            &inputs,
            &pids,
            zh,
            zl,
            cfg.h_cycles - 1,
            false,
        );
        std::hint::black_box(&out.logits);
        t.elapsed().as_secs_f64() * 1e3
    };
    let step = || {
        // a persistent context, as the trainer keeps: its pool recycles the
        // activations and the tape between steps
        let zh = broadcast_init(&ctx.dm, &p.h_init);
        let zl = broadcast_init(&ctx.dm, &p.l_init);
        let t = Instant::now();
        let r = act_step_train_in(&ctx, cfg, &p, &batch, zh, zl, cfg.h_cycles - 1).expect("step");
        std::hint::black_box(&r.grads);
        t.elapsed().as_secs_f64() * 1e3
    };
    let parts = std::env::var("BENCH_PARTS").unwrap_or_default();
    let (do_fwd, do_step) = match parts.as_str() {
        "fwd" => (true, false),
        "step" => (false, true),
        _ => (true, true),
    };
    let f: Vec<f64> = if do_fwd {
        fwd();
        (0..reps).map(|_| fwd()).collect()
    } else {
        vec![f64::NAN]
    };
    let s: Vec<f64> = if do_step {
        step();
        (0..reps).map(|_| step()).collect()
    } else {
        vec![f64::NAN]
    };
    let (s_tok, d) = (cfg.total_seq_len(), cfg.hidden_size);
    // GEMM flops of one forward: 15 L-calls x layers x 2*M*(D*(3D+D+2F) + F*D) + attention 4*M*S*D
    let m = (b * s_tok) as f64;
    let ff = cfg.intermediate_size() as f64;
    let df = d as f64;
    let per_block = 2.0 * m * (df * (4.0 * df + 2.0 * ff) + ff * df) + 4.0 * m * s_tok as f64 * df;
    let calls = (cfg.h_cycles * (cfg.l_cycles + 1) * cfg.l_layers) as f64;
    let gflop = per_block * calls / 1e9;
    let fm = median(f);
    let smin = s.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{label:<28} B {b:>3}  forward {fm:>9.1} ms ({:>5.1} GFLOP/s)  fwd+bwd {:>9.1} ms (min {smin:.1})",
        gflop / fm * 1e3,
        median(s)
    );
}

fn main() {
    let reps: Option<usize> = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok());
    let only = std::env::var("BENCH_ONLY").ok();
    let want = |c: &str| only.as_deref().is_none_or(|o| o == c);
    let only_b: Option<usize> = std::env::var("BENCH_B").ok().and_then(|v| v.parse().ok());
    let want_b = |b: usize| only_b.is_none_or(|o| o == b);
    // `cargo test --all-targets` runs this binary without `--bench`: a smoke
    // run at the smallest case keeps the test suite fast; `cargo bench` measures.
    if !std::env::args().any(|a| a == "--bench") {
        let c = config(64, 2, 36, 2);
        bench_case("(smoke) D64 H2 S38", &c, 4, 1);
        return;
    }
    println!(
        "act_step bench: {} rayon threads, gemm ISA {}",
        rayon::current_num_threads(),
        gemm_isa()
    );
    if want("a") {
        let c = config(512, 8, 900, 16);
        if want_b(1) {
            bench_case("(a) D512 H8 S916", &c, 1, reps.unwrap_or(3));
        }
        if want_b(4) {
            bench_case("(a) D512 H8 S916", &c, 4, reps.unwrap_or(1));
        }
    }
    if want("b") {
        let c = config(128, 4, 88, 16);
        bench_case("(b) D128 H4 S104", &c, 16, reps.unwrap_or(5));
    }
    if want("c") {
        let c = config(64, 2, 36, 2);
        bench_case("(c) D64 H2 S38", &c, 64, reps.unwrap_or(5));
    }
}
