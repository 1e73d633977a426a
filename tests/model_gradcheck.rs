//! Model-level checks of the CPU reference engine (`trm::model::trm`):
//! - f64 finite-difference check of the whole ACT-step loss against the
//!   hand-written backward, for every weight tensor and the puzzle rows;
//! - invariants (zero Q head gives -5, puzzle padding positions are zero,
//!   batch permutation equivariance);
//! - f32 parity with the PyTorch golden files (relative error per tensor).

#![allow(clippy::needless_range_loop)] // index math mirrors the [B, ...] layouts

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trm::model::config::{ArchConfig, PosEncodings};
use trm::model::safetensors_io;
use trm::model::trm::{
    act_step_train_generic, input_embedding_forward, Batch, Dims, Grads, Params,
};
use trm::tensor::Tensor;

mod fixtures;
use fixtures::{rand_batch, rand_params};

/// D 16, 2 heads, S 12 (+2 puzzle positions), 2 layers, H 2, L 2, V 6.
fn tiny_config() -> ArchConfig {
    let mut c = ArchConfig::trm_default(12, 6, 5);
    c.hidden_size = 16;
    c.num_heads = 2;
    c.expansion = 4.0;
    c.l_layers = 2;
    c.h_cycles = 2;
    c.l_cycles = 2;
    c.puzzle_emb_ndim = 16;
    c.puzzle_emb_len = 2;
    c.pos_encodings = PosEncodings::Rope;
    c.forward_dtype = "float32".into();
    c
}

/// Every trainable parameter buffer (and its gradient) by name.
fn named_buffers<'a>(
    p: &'a mut Params<f64>,
    g: &'a Grads<f64>,
) -> Vec<(String, &'a mut Vec<f64>, &'a Vec<f64>)> {
    let mut out: Vec<(String, &mut Vec<f64>, &Vec<f64>)> = vec![
        ("embed".into(), &mut p.embed, &g.embed),
        ("lm_head".into(), &mut p.lm_head, &g.lm_head),
        ("q_w".into(), &mut p.q_w, &g.q_w),
        ("q_b".into(), &mut p.q_b, &g.q_b),
    ];
    for (i, (lp, lg)) in p.layers.iter_mut().zip(&g.layers).enumerate() {
        out.push((format!("layer{i}.qkv"), &mut lp.qkv, &lg.qkv));
        out.push((format!("layer{i}.o"), &mut lp.o, &lg.o));
        out.push((format!("layer{i}.gate_up"), &mut lp.gate_up, &lg.gate_up));
        out.push((format!("layer{i}.down"), &mut lp.down, &lg.down));
    }
    out
}

/// The function the analytic gradient differentiates: the gradient cycle run
/// from the (frozen) state the no-grad cycles produced at the base weights.
/// (The reference detaches those cycles, so perturbing weights must not
/// change them either.)
struct Frozen {
    z_h: Vec<f64>,
    z_l: Vec<f64>,
}

fn frozen(cfg: &ArchConfig, p: &Params<f64>, batch: &Batch<'_>) -> Frozen {
    let dm = Dims::new(cfg, batch.b);
    let z_h = trm::model::trm::broadcast_init(&dm, &p.h_init);
    let z_l = trm::model::trm::broadcast_init(&dm, &p.l_init);
    let (z_h, z_l) =
        trm::model::trm::nograd_cycles(cfg, p, batch, z_h, z_l, cfg.h_cycles - 1).expect("nograd");
    Frozen { z_h, z_l }
}

fn loss_from(cfg: &ArchConfig, p: &Params<f64>, batch: &Batch<'_>, fz: &Frozen) -> f64 {
    trm::model::trm::act_step_train_from_carry(cfg, p, batch, fz.z_h.clone(), fz.z_l.clone(), 0)
        .expect("step")
        .loss
        .loss
}

/// Central differences (h = 1e-5) on the f64 path; per tensor relative error
/// `||analytic - numeric|| / ||numeric||` must stay under 1e-6. Each tensor
/// is probed at up to 24 random coordinates to keep the test fast.
#[test]
fn full_act_step_gradcheck_f64() {
    let cfg = tiny_config();
    let b = 2;
    let (inputs, labels, pids) = rand_batch(&cfg, b, 7);
    let pids = vec![pids[0], (pids[0] + 1) % cfg.num_puzzle_identifiers as i32];
    let batch = Batch {
        inputs: &inputs,
        labels: &labels,
        puzzle_ids: &pids,
        b,
    };
    let mut p = rand_params::<f64>(&cfg, 3);
    let r = act_step_train_generic(&cfg, &p, &batch).expect("step");
    let g = r.grads.clone();
    let fz = frozen(&cfg, &p, &batch);
    // the frozen-state step reproduces the full step
    let again = trm::model::trm::act_step_train_from_carry(
        &cfg,
        &p,
        &batch,
        fz.z_h.clone(),
        fz.z_l.clone(),
        0,
    )
    .expect("step");
    assert!((again.loss.loss - r.loss.loss).abs() < 1e-12);
    assert_eq!(again.grads, g);
    let loss_of =
        |cfg: &ArchConfig, p: &Params<f64>, batch: &Batch<'_>| loss_from(cfg, p, batch, &fz);
    let h = 1e-5;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut worst = 0.0f64;
    let names: Vec<String> = named_buffers(&mut p.clone(), &g)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    for (ti, name) in names.iter().enumerate() {
        let len = named_buffers(&mut p, &g)[ti].1.len();
        let idx: Vec<usize> = (0..len.min(24)).map(|_| rng.gen_range(0..len)).collect();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for &i in &idx {
            let orig = named_buffers(&mut p, &g)[ti].1[i];
            named_buffers(&mut p, &g)[ti].1[i] = orig + h;
            let lp = loss_of(&cfg, &p, &batch);
            named_buffers(&mut p, &g)[ti].1[i] = orig - h;
            let lm = loss_of(&cfg, &p, &batch);
            named_buffers(&mut p, &g)[ti].1[i] = orig;
            let numeric = (lp - lm) / (2.0 * h);
            let analytic = named_buffers(&mut p, &g)[ti].2[i];
            if std::env::var("GRADCHECK_VERBOSE").is_ok() {
                eprintln!("{name}[{i}]: analytic {analytic:e} numeric {numeric:e}");
            }
            num += (numeric - analytic).powi(2);
            den += numeric * numeric;
        }
        let rel = num.sqrt() / den.sqrt().max(1e-10);
        worst = worst.max(rel);
        assert!(rel < 1e-6, "{name}: rel err {rel:e}");
    }
    // puzzle-embedding rows of the batch (gradient w.r.t. local_weights)
    let nd = cfg.puzzle_emb_ndim;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for bi in 0..b {
        let row = pids[bi] as usize;
        for j in 0..nd {
            let k = row * nd + j;
            let orig = p.puzzle_emb[k];
            p.puzzle_emb[k] = orig + h;
            let lp = loss_of(&cfg, &p, &batch);
            p.puzzle_emb[k] = orig - h;
            let lm = loss_of(&cfg, &p, &batch);
            p.puzzle_emb[k] = orig;
            let numeric = (lp - lm) / (2.0 * h);
            let analytic = g.puzzle_local[bi * nd + j];
            num += (numeric - analytic).powi(2);
            den += numeric * numeric;
        }
    }
    let rel = num.sqrt() / den.sqrt().max(1e-10);
    assert!(rel < 1e-6, "puzzle rows: rel err {rel:e}");
    eprintln!("gradcheck worst rel err {:e}", worst.max(rel));
}

/// Same check at H_cycles = 1, L_cycles = 1, 1 layer, 3 heads, odd S, no
/// puzzle positions beyond the first (P = 1).
#[test]
fn gradcheck_single_cycle_odd_shapes() {
    let mut cfg = tiny_config();
    cfg.hidden_size = 12;
    cfg.num_heads = 3;
    cfg.l_layers = 1;
    cfg.h_cycles = 1;
    cfg.l_cycles = 1;
    cfg.seq_len = 7;
    cfg.puzzle_emb_ndim = 12;
    cfg.puzzle_emb_len = 1;
    let b = 3;
    let (inputs, labels, pids) = rand_batch(&cfg, b, 8);
    let batch = Batch {
        inputs: &inputs,
        labels: &labels,
        puzzle_ids: &pids,
        b,
    };
    let mut p = rand_params::<f64>(&cfg, 4);
    let g = act_step_train_generic(&cfg, &p, &batch)
        .expect("step")
        .grads;
    // H_cycles = 1: no detached cycles, so this is the full function
    let loss_of = |cfg: &ArchConfig, p: &Params<f64>, batch: &Batch<'_>| {
        act_step_train_generic(cfg, p, batch)
            .expect("step")
            .loss
            .loss
    };
    let h = 1e-5;
    for k in 0..p.layers[0].qkv.len().min(40) {
        let orig = p.layers[0].qkv[k];
        p.layers[0].qkv[k] = orig + h;
        let lp = loss_of(&cfg, &p, &batch);
        p.layers[0].qkv[k] = orig - h;
        let lm = loss_of(&cfg, &p, &batch);
        p.layers[0].qkv[k] = orig;
        let numeric = (lp - lm) / (2.0 * h);
        let a = g.layers[0].qkv[k];
        assert!(
            (numeric - a).abs() < 1e-6 * (1.0 + numeric.abs()),
            "qkv[{k}]: {a} vs {numeric}"
        );
    }
}

#[test]
fn zero_q_head_gives_minus_five_and_padding_is_zero() {
    let cfg = tiny_config();
    let b = 2;
    let (inputs, labels, pids) = rand_batch(&cfg, b, 9);
    let mut p = rand_params::<f64>(&cfg, 5);
    p.q_w.iter_mut().for_each(|x| *x = 0.0);
    p.q_b = vec![-5.0, -5.0];
    let batch = Batch {
        inputs: &inputs,
        labels: &labels,
        puzzle_ids: &pids,
        b,
    };
    let r = act_step_train_generic(&cfg, &p, &batch).expect("step");
    assert!(r.out.q.iter().all(|&q| q == -5.0));
    assert!(r.halted.iter().all(|&h| !h));
    assert!(r.steps.iter().all(|&s| s == 1));
    let dm = Dims::new(&cfg, b);
    let x = input_embedding_forward(&dm, &p, &inputs, &pids);
    let scale = (dm.d as f64).sqrt();
    for bi in 0..b {
        let xb = &x[bi * dm.s * dm.d..];
        let row = &p.puzzle_emb[pids[bi] as usize * dm.ndim..][..dm.ndim];
        for j in 0..dm.d {
            assert!((xb[j] - row[j] * scale).abs() < 1e-12);
        }
        assert!(xb[dm.d..dm.p * dm.d].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn batch_permutation_permutes_outputs() {
    let cfg = tiny_config();
    let b = 3;
    let (inputs, labels, pids) = rand_batch(&cfg, b, 10);
    let p = rand_params::<f64>(&cfg, 6);
    let run = |order: &[usize]| {
        let n = cfg.seq_len;
        let pick = |v: &[i32], w: usize| -> Vec<i32> {
            order
                .iter()
                .flat_map(|&i| v[i * w..(i + 1) * w].to_vec())
                .collect()
        };
        let (i2, l2, p2) = (pick(&inputs, n), pick(&labels, n), pick(&pids, 1));
        let batch = Batch {
            inputs: &i2,
            labels: &l2,
            puzzle_ids: &p2,
            b,
        };
        act_step_train_generic(&cfg, &p, &batch).expect("step")
    };
    let a = run(&[0, 1, 2]);
    let order = [2, 0, 1];
    let c = run(&order);
    let dm = Dims::new(&cfg, b);
    let per = dm.seq * dm.v;
    for (k, &i) in order.iter().enumerate() {
        let (x, y) = (
            &a.out.logits[i * per..(i + 1) * per],
            &c.out.logits[k * per..(k + 1) * per],
        );
        for (u, v) in x.iter().zip(y) {
            assert!((u - v).abs() < 1e-12);
        }
        let zs = dm.s * dm.d;
        for (u, v) in a.out.z_h[i * zs..(i + 1) * zs]
            .iter()
            .zip(&c.out.z_h[k * zs..(k + 1) * zs])
        {
            assert!((u - v).abs() < 1e-12);
        }
        assert!((a.out.q[i * 2] - c.out.q[k * 2]).abs() < 1e-12);
        assert_eq!(a.halted[i], c.halted[k]);
        let nd = dm.ndim;
        for (u, v) in a.grads.puzzle_local[i * nd..(i + 1) * nd]
            .iter()
            .zip(&c.grads.puzzle_local[k * nd..(k + 1) * nd])
        {
            assert!((u - v).abs() < 1e-10);
        }
    }
    assert!((a.loss.loss - c.loss.loss).abs() < 1e-10);
    for (u, v) in a.grads.lm_head.iter().zip(&c.grads.lm_head) {
        assert!((u - v).abs() < 1e-10);
    }
}

/// f32 parity with the PyTorch reference's golden cases (skipped when the
/// shared golden folder is absent).
#[test]
fn golden_parity_cpu_f32() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/golden"));
    let Ok(entries) = std::fs::read_dir(&root) else {
        eprintln!("no golden folder at {}; skipped", root.display());
        return;
    };
    let mut cases: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    for case in cases {
        let cfg = ArchConfig::from_json_file(&case.join("config.json")).expect("config");
        let wmap =
            safetensors_io::load_tensors(&case.join("weights.safetensors")).expect("weights");
        let bpath = case.join("batch.safetensors");
        let inputs = safetensors_io::load_i32(&bpath, "inputs").expect("inputs");
        let labels = safetensors_io::load_i32(&bpath, "labels").expect("labels");
        let pids = safetensors_io::load_i32(&bpath, "puzzle_identifiers").expect("pids");
        let b = pids.data.len();
        let p = Params::<f32>::from_map(&cfg, &wmap).expect("params");
        let out = trm::model::trm::act_step_train_params(
            &cfg,
            &p,
            &inputs.data,
            &labels.data,
            &pids.data,
            b,
        )
        .expect("step");
        let exp = safetensors_io::load_tensors_as_f32(&case.join("expected.safetensors"))
            .expect("expected");
        let mut got: BTreeMap<String, Tensor> = out.grads.clone();
        got.insert("logits".into(), out.logits.clone());
        got.insert("q_halt_logits".into(), out.q_halt_logits.clone());
        got.insert("q_continue_logits".into(), out.q_continue_logits.clone());
        got.insert("z_H".into(), out.z_h.clone());
        got.insert("z_L".into(), out.z_l.clone());
        got.insert("loss".into(), Tensor::scalar(out.loss as f32));
        got.insert("lm_loss".into(), Tensor::scalar(out.lm_loss as f32));
        got.insert("q_halt_loss".into(), Tensor::scalar(out.q_halt_loss as f32));
        got.insert(
            "halted".into(),
            Tensor::new(&[b], out.halted.iter().map(|&h| h as u8 as f32).collect()),
        );
        got.insert(
            "steps".into(),
            Tensor::new(&[b], out.steps.iter().map(|&s| s as f32).collect()),
        );
        let mut worst = 0.0f64;
        for (name, want) in &exp {
            let g = got
                .get(name)
                .unwrap_or_else(|| panic!("{}: no output {name}", case.display()));
            assert_eq!(g.data.len(), want.data.len(), "{name}: size");
            let rel = g.rel_err(want);
            eprintln!(
                "{} {name}: rel err {rel:.3e}",
                case.file_name().unwrap().to_string_lossy()
            );
            worst = worst.max(rel);
            assert!(rel < 1e-4, "{}: {name} rel err {rel:e}", case.display());
        }
        eprintln!("{}: worst rel err {worst:.3e}", case.display());
    }
}

/// Every step entry point refuses a carry of the wrong shape with a typed
/// error (never a panic), naming the carry.
#[test]
fn step_entry_points_refuse_misshapen_carries() {
    use trm::model::trm::{act_step_train_from_carry, broadcast_init, nograd_cycles, TrmError};
    let cfg = tiny_config();
    let b = 2;
    let (inputs, labels, pids) = rand_batch(&cfg, b, 11);
    let p = rand_params::<f64>(&cfg, 6);
    let batch = Batch {
        inputs: &inputs,
        labels: &labels,
        puzzle_ids: &pids,
        b,
    };
    let dm = Dims::new(&cfg, b);
    let z_h = broadcast_init(&dm, &p.h_init);
    let z_l = broadcast_init(&dm, &p.l_init);
    let short = z_l[..z_l.len() - 1].to_vec();
    let named = |r: Result<_, TrmError>, want: &str| match r {
        Err(TrmError::BatchShape { what, .. }) => assert_eq!(what, want),
        Err(e) => panic!("expected a {want} shape error, got {e}"),
        Ok(_) => panic!("expected a {want} shape error, got a result"),
    };
    named(
        nograd_cycles(&cfg, &p, &batch, z_h.clone(), short.clone(), 1).map(|_| ()),
        "z_L",
    );
    named(
        act_step_train_from_carry(&cfg, &p, &batch, short.clone(), z_l.clone(), 1).map(|_| ()),
        "z_H",
    );
    // The well-shaped carry still runs.
    assert!(nograd_cycles(&cfg, &p, &batch, z_h, z_l, 1).is_ok());
}
