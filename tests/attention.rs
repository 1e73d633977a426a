//! The fused RoPE + attention kernels (`kernels/attention.cu`) against an f64
//! CPU reference (`backend::cpu::rope` + `backend::cpu::attention` in f64)
//! on random bf16-representable inputs, at sequence lengths that straddle the
//! 64-row tiles (1, 5, 37, 64, 65, 129: tail tiles masked for keys and for
//! queries), head dims 32, 64 and 128, 1 and 3 heads, batch 1 and 2.
//!
//! Tolerances (bf16 operands, f32 accumulation; bf16 lands between 1e-3 and
//! 1e-2 relative): forward `o` relative L2 error < 1e-2 and backward `dqkv`
//! relative L2 < 2e-2 for each of the q, k and v parts (P and dS are rounded
//! to bf16 before their products), both against the exact f64 reference.
//! `lse` absolute < 1e-3 against the f64 reference whose rotated q and k are
//! rounded to bf16 as the kernel rounds them (as the unfused rope.cu path and
//! the PyTorch bf16 run do too): that one rounding moves the scores by up to
//! ~5e-3 at d 128, and the check is there for the softmax arithmetic.
//! Every output is poisoned with NaN before each launch, so an element the
//! kernel never writes fails. The backward must give identical bits twice.
//!
//! Each body runs on the emulator (`_emu`) and on GPU 0 (`_gpu`, which says
//! "no CUDA device" and asserts nothing on a machine without one).

use half::bf16;
use trm::backend::cpu::{attention as cpu_att, rope as cpu_rope};
use trm::backend::cuda::ops::attention::{
    attention_backward, attention_forward, attention_plan, AttentionShape, SharedPlan,
};
use trm::backend::cuda::CudaError;

mod device;
use device::{rng, to_bf16, to_f32, uniform, Dev};

/// Relative L2 error ||got - want|| / ||want||; NaN anywhere is infinite.
/// The denominator is at least an RMS of 1e-3 per element: at S 1 the exact
/// dq and dk are zero (one key: P = 1, dP = delta) and the kernel's are f32
/// rounding residue (~1e-8), while real gradients here are ~1e-1 per element.
fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    (num / den.max(1e-6 * want.len() as f64)).sqrt()
}

/// The reference's results for one case.
struct Reference {
    o: Vec<f64>,
    lse: Vec<f64>,
    dqkv: Vec<f64>,
}

/// One random case: the bf16 inputs as the kernels see them and the f32
/// RoPE tables, with the f64 reference computed from exactly those values.
struct Case {
    s: AttentionShape,
    qkv: Vec<bf16>,
    dout: Vec<bf16>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Case {
    fn new(s: AttentionShape, seed: u64) -> Case {
        let mut r = rng(seed);
        let qkv = to_bf16(&uniform(&mut r, s.qkv_len().unwrap(), 2.0));
        let dout = to_bf16(&uniform(&mut r, s.o_len().unwrap(), 1.0));
        let t = cpu_rope::rope_tables::<f32>(s.seq, s.head_dim, 10000.0);
        Case {
            s,
            qkv,
            dout,
            cos: t.cos,
            sin: t.sin,
        }
    }

    /// The f64 reference; with `round_rotated`, the rotated q and k are
    /// rounded to bf16 before the attention (the kernel's one rounding of
    /// its inputs).
    fn reference(&self, round_rotated: bool) -> Reference {
        let s = &self.s;
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let tables = cpu_rope::RopeTables {
            cos: f64s(&self.cos),
            sin: f64s(&self.sin),
            s: s.seq,
            d: s.head_dim,
        };
        let mut qkv = f64s(&to_f32(&self.qkv));
        cpu_rope::rope_forward(&mut qkv, &tables, s.heads);
        if round_rotated {
            for v in qkv.iter_mut() {
                *v = bf16::from_f64(*v).to_f64();
            }
        }
        let mut o = vec![0.0; s.o_len().unwrap()];
        let mut lse = vec![0.0; s.rows().unwrap()];
        let (b, sq, h, d) = (s.batch, s.seq, s.heads, s.head_dim);
        cpu_att::attention_forward(&mut o, &mut lse, &qkv, b, sq, h, d);
        let dout = f64s(&to_f32(&self.dout));
        let mut dqkv = vec![0.0; s.qkv_len().unwrap()];
        cpu_att::attention_backward(&mut dqkv, &dout, &qkv, &lse, b, sq, h, d);
        cpu_rope::rope_backward(&mut dqkv, &tables, s.heads);
        Reference { o, lse, dqkv }
    }
}

/// The q, k and v parts (each [B, S, H d]) of a qkv-layout vector.
fn parts<T: Copy>(x: &[T], s: &AttentionShape) -> [Vec<T>; 3] {
    let w = s.heads * s.head_dim;
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for row in x.chunks(3 * w) {
        for (p, part) in out.iter_mut().enumerate() {
            part.extend_from_slice(&row[p * w..(p + 1) * w]);
        }
    }
    out
}

/// The device's results: o, lse, and two backward runs' dqkv.
struct Outputs {
    o: Vec<f32>,
    lse: Vec<f32>,
    dqkv: Vec<bf16>,
    dqkv_again: Vec<bf16>,
}

fn run(dev: &Dev, c: &Case) -> Outputs {
    let s = c.s;
    let qkv = dev.upload(&c.qkv);
    let dout = dev.upload(&c.dout);
    let cos = dev.upload(&c.cos);
    let sin = dev.upload(&c.sin);
    let nan_bf16 = vec![bf16::NAN; s.o_len().unwrap()];
    let o = dev.upload(&nan_bf16);
    let lse = dev.upload(&vec![f32::NAN; s.rows().unwrap()]);
    let d = dev.device();
    dev.ok(
        "attention_forward",
        attention_forward(d, &o, &lse, &qkv, &cos, &sin, s),
    );
    let backward = || {
        let dqkv = dev.upload(&vec![bf16::NAN; s.qkv_len().unwrap()]);
        let delta = dev.upload(&vec![f32::NAN; s.rows().unwrap()]);
        dev.ok(
            "attention_backward",
            attention_backward(d, &dqkv, &delta, &qkv, &cos, &sin, &o, &lse, &dout, s),
        );
        dev.download(&dqkv)
    };
    let dqkv = backward();
    let dqkv_again = backward();
    Outputs {
        o: to_f32(&dev.download(&o)),
        lse: dev.download(&lse),
        dqkv,
        dqkv_again,
    }
}

fn check(dev: &Dev, s: AttentionShape, seed: u64) {
    let case = Case::new(s, seed);
    let want = case.reference(false);
    let rounded = case.reference(true);
    let got = run(dev, &case);
    let at = format!("{} {s:?}", dev.name());
    let e = rel_l2(&got.o, &want.o);
    assert!(e < 1e-2, "{at}: o relative L2 error {e:.2e}");
    let worst = got
        .lse
        .iter()
        .zip(&rounded.lse)
        .map(|(&g, &w)| {
            if g.is_finite() {
                (g as f64 - w).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max);
    assert!(worst < 1e-3, "{at}: lse worst absolute error {worst:.2e}");
    let got_parts = parts(&to_f32(&got.dqkv), &s);
    let want_parts = parts(&want.dqkv, &s);
    let mut errors = format!("o {e:.1e} lse {worst:.1e}");
    for (name, (g, w)) in ["dq", "dk", "dv"]
        .iter()
        .zip(got_parts.iter().zip(&want_parts))
    {
        let e = rel_l2(g, w);
        assert!(e < 2e-2, "{at}: {name} relative L2 error {e:.2e}");
        errors += &format!(" {name} {e:.1e}");
    }
    eprintln!("{at}: {errors}");
    let same = got
        .dqkv
        .iter()
        .zip(&got.dqkv_again)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{at}: two backward runs differ");
}

fn shape(batch: usize, seq: usize, heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape {
        batch,
        seq,
        heads,
        head_dim,
    }
}

/// Every sequence length at both small head dims, with 1 and 3 heads and
/// batch 1 and 2 spread over them so each value meets each other.
fn small_shapes(dev: &Dev) {
    let mut seed = 1;
    for &seq in &[1, 5, 37, 64, 65, 129] {
        for &(head_dim, heads, batch) in &[(32, 3, 2), (64, 1, 1), (64, 3, 2), (32, 1, 1)] {
            check(dev, shape(batch, seq, heads, head_dim), seed);
            seed += 1;
        }
    }
}
on_both!(small_shapes_emu, small_shapes_gpu, small_shapes);

/// Head dim 128 (its own tiles: 64 queries per forward block, 16 per dK/dV
/// inner tile), with tail tiles.
fn head_dim_128(dev: &Dev) {
    check(dev, shape(1, 70, 2, 128), 100);
}
on_both!(head_dim_128_emu, head_dim_128_gpu, head_dim_128);

/// The ARC shape's sequence length (916: 7 full 128-query tiles and a tail of
/// 20, 14 full key tiles and a tail of 20) at batch 1, one head.
fn arc_sequence(dev: &Dev) {
    check(dev, shape(1, 916, 1, 64), 200);
}
on_both!(arc_sequence_emu, arc_sequence_gpu, arc_sequence);

/// Bad shapes and short buffers are typed errors, never launches.
#[test]
fn launchers_reject_bad_shapes() {
    let dev = Dev::emu();
    let d = dev.device();
    let s = shape(1, 8, 2, 64);
    let qkv = dev.zeros::<bf16>(s.qkv_len().unwrap());
    let o = dev.zeros::<bf16>(s.o_len().unwrap());
    let lse = dev.zeros::<f32>(s.rows().unwrap());
    let table = dev.zeros::<f32>(8 * 64);
    let short = dev.zeros::<bf16>(s.qkv_len().unwrap() - 1);
    let shape_err = |r: Result<(), CudaError>, what: &str| match r {
        Err(CudaError::Shape(m)) => assert!(m.contains(what), "{m}"),
        other => panic!("expected a shape error naming {what:?}, got {other:?}"),
    };
    let odd = shape(1, 8, 2, 48);
    shape_err(
        attention_forward(d, &o, &lse, &qkv, &table, &table, odd),
        "head_dim 48",
    );
    shape_err(
        attention_forward(d, &o, &lse, &short, &table, &table, s),
        "needs",
    );
    shape_err(
        attention_forward(d, &o, &lse, &qkv, &table, &table, shape(0, 8, 2, 64)),
        "empty shape",
    );
    let dqkv = dev.zeros::<bf16>(s.qkv_len().unwrap());
    let short_delta = dev.zeros::<f32>(s.rows().unwrap() - 1);
    shape_err(
        attention_backward(
            d,
            &dqkv,
            &short_delta,
            &qkv,
            &table,
            &table,
            &o,
            &lse,
            &o,
            s,
        ),
        "needs",
    );
}

/// Opt-in shared memory per block: sm_90 (H100/H200), sm_80 (A100), and
/// sm_86/sm_89 (A10, L4, RTX 30xx/40xx).
const SM90_SHARED: usize = 227 * 1024;
const SM80_SHARED: usize = 163 * 1024;
const SM89_SHARED: usize = 99 * 1024;

/// On sm_90 every kernel stages its table rows (the measured H200 layout),
/// the kernels of head dims 64 and 128 ask for more than the 48 KiB default
/// of dynamic shared memory (so their launches exercise the runtime's
/// opt-in), and every head dim stays within 227 KiB.
#[test]
fn shared_memory_needs_the_opt_in_and_fits() {
    for d in [32, 64, 128] {
        let plan = attention_plan(d, SM90_SHARED);
        assert!(
            plan.forward.stage_tables && plan.dq.stage_tables,
            "d {d}: {plan:?}"
        );
        for (what, p) in [
            ("forward", plan.forward),
            ("dkdv", plan.dkdv),
            ("dq", plan.dq),
        ] {
            assert!(
                p.bytes > 48 * 1024 || d < 64,
                "{what} d {d}: {} B does not exercise the opt-in",
                p.bytes
            );
            assert!(
                p.bytes <= SM90_SHARED,
                "{what} d {d}: {p:?} over sm_90's limit"
            );
        }
    }
    // The staged table rows of a 64-key tile: 2 tables x 64 rows x d f32.
    assert_eq!(
        attention_plan(64, SM90_SHARED).dq,
        SharedPlan {
            bytes: 106_496,
            stage_tables: true
        }
    );
}

/// On smaller GPUs a query-tile kernel drops its staged table rows (and
/// only then): at the ARC config (hidden 512, 8 heads: head dim 64) every
/// launch fits an L4's 99 KiB, the forward still staged; at d 128 an A100
/// fits all but the dQ kernel's staging.
#[test]
fn arc_config_fits_an_l4() {
    let arc = trm::model::config::ArchConfig::trm_default(900, 12, 1000);
    assert_eq!((arc.head_dim(), arc.total_seq_len()), (64, 916));
    let plan = attention_plan(arc.head_dim(), SM89_SHARED);
    for (what, p) in [
        ("forward", plan.forward),
        ("dkdv", plan.dkdv),
        ("dq", plan.dq),
    ] {
        assert!(p.bytes <= SM89_SHARED, "ARC {what} on an L4: {p:?}");
    }
    assert!(plan.forward.stage_tables, "{plan:?}");
    assert_eq!(
        plan.dq,
        SharedPlan {
            bytes: 73_728,
            stage_tables: false
        }
    );
    let a100 = attention_plan(128, SM80_SHARED);
    assert!(
        a100.forward.stage_tables && !a100.dq.stage_tables,
        "{a100:?}"
    );
    // What fits nowhere is left over the limit, for the runtime to refuse.
    let l4_d128 = attention_plan(128, SM89_SHARED);
    assert!(!l4_d128.dq.stage_tables && l4_d128.dq.bytes > SM89_SHARED);
}

/// The unstaged kernels (table rows from global memory) on the emulator with
/// less shared memory: an L4's 99 KiB (the dQ kernel unstaged at d 64) and 80
/// KiB (the forward too), with the same checks as staged; and the refusal of
/// what does not fit (dQ at d 128 on an L4) is a typed error naming the kernel.
#[test]
fn smaller_shared_memory_emu() {
    use trm::backend::cuda::emu::{self, EmuOptions};
    let dev = Dev::emu();
    let limited = |bytes: usize| EmuOptions {
        max_shared_per_block: Some(bytes as u32),
        ..EmuOptions::default()
    };
    for (bytes, forward_staged) in [(SM89_SHARED, true), (80 * 1024, false)] {
        let plan = attention_plan(64, bytes);
        assert_eq!(
            (plan.forward.stage_tables, plan.dq.stage_tables),
            (forward_staged, false)
        );
        emu::with_options(limited(bytes), || {
            assert_eq!(dev.device().max_shared_per_block(), bytes as u32);
            check(&dev, shape(2, 129, 3, 64), 400);
        });
    }
    emu::with_options(limited(SM89_SHARED), || {
        let s = shape(1, 70, 1, 128);
        let c = Case::new(s, 402);
        let d = dev.device();
        let (qkv, cos, sin) = (dev.upload(&c.qkv), dev.upload(&c.cos), dev.upload(&c.sin));
        let o = dev.zeros::<bf16>(s.o_len().unwrap());
        let lse = dev.zeros::<f32>(s.rows().unwrap());
        // The forward fits unstaged (85 KiB) ...
        dev.ok(
            "attention_forward d 128",
            attention_forward(d, &o, &lse, &qkv, &cos, &sin, s),
        );
        // ... the dQ kernel does not (102 KiB even unstaged).
        let dqkv = dev.zeros::<bf16>(s.qkv_len().unwrap());
        let delta = dev.zeros::<f32>(s.rows().unwrap());
        let dout = dev.upload(&c.dout);
        let e =
            attention_backward(d, &dqkv, &delta, &qkv, &cos, &sin, &o, &lse, &dout, s).unwrap_err();
        assert!(
            matches!(e, CudaError::SharedMemory { max, .. } if max == SM89_SHARED as u32),
            "{e:?}"
        );
        assert!(e.to_string().contains("attention_backward_dq_d128"), "{e}");
    });
}

/// The emulator catches a missing barrier in each kernel's tile loop: with
/// the `__syncthreads` after the next tile's copies planted out
/// (`EmuOptions::skip_barrier_line`), threads rotate rows whose copies other
/// threads issued and have not landed, and the check against the reference
/// fails; with it, the same case passes. Likewise the forward's barrier after
/// the rotation of the next K tile (the first read after it is of that tile).
/// The backward's barriers after the rotation are not caught this way: the
/// emulator runs threads round-robin, so by the time a warp's first read of
/// the rotated tile (its second ldmatrix after the barrier) happens, every
/// other thread has already rotated its rows.
#[test]
fn a_missing_barrier_is_caught_emu() {
    use trm::backend::cuda::emu::{self, EmuOptions};
    let source = include_str!("../kernels/attention.cu");
    let dev = Dev::emu();
    // Two key (and query) tiles, so each loop crosses the barrier.
    let s = shape(1, 100, 1, 64);
    check(&dev, s, 300);
    for marker in [
        "barrier: next K/V tile landed (forward)",
        "barrier: rotated K tile (forward)",
        "barrier: next Q/dO tile landed (dK/dV)",
        "barrier: next K/V tile landed (dQ)",
    ] {
        let line = source
            .lines()
            .position(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("kernels/attention.cu has no line marked {marker:?}"))
            + 1;
        let options = EmuOptions {
            skip_barrier_line: Some(line as u32),
            ..EmuOptions::default()
        };
        let caught =
            std::panic::catch_unwind(|| emu::with_options(options, || check(&dev, s, 300)));
        assert!(
            caught.is_err(),
            "dropping the {marker} (line {line}) went unnoticed"
        );
    }
}
