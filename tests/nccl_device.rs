//! Data parallel on the CUDA engine with collectives on device buffers.
//!
//! On the emulator, a fake collective stands for `n` ranks that all hold
//! this rank's data ("mirror": every sum is n times the part, every gather
//! n copies of it). Through the host path and through the device path (the
//! bucketed all-reduce started during the backward) it must give the same
//! bits: multiplying by 2 commutes with rounding, so any bucket reduced
//! before its last accumulation, reduced twice or never, shows.
//!
//! On a GPU (`_gpu`): NCCL itself, with a world of one rank: the
//! rendezvous, the all-reduce of a buffer the size of the ARC config's
//! gradients, the host collectives, training steps equal to the single
//! process's, and a checkpoint (export, import, the same next step). With
//! TRM_REQUIRE_GPU=1 a missing GPU or NCCL fails instead of skipping.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trm::backend::cuda::{Buffer, Device};
use trm::dist::nccl::NcclCollective;
use trm::dist::{Collective, CollectiveError, DeviceCollective, SingleProcess, World};
use trm::model::act;
use trm::model::config::ArchConfig;
use trm::model::engine::{Engine, EngineConfig, OptimStep};
use trm::model::gpu::buckets::Ready;
use trm::model::gpu::GpuEngine;
use trm::model::trm::{Batch, Params};
use trm::model::weights::Weights;
use trm::optim::AdamAtan2Config;

mod device;
use device::Dev;
mod fixtures;
use fixtures::rand_batch;

/// Two layers (so the device path has a bucket per layer and one for the
/// prefix), L_cycles 2 (the backward's parts all do something), H_cycles 1
/// (fast on the emulator), puzzle embeddings.
fn config() -> ArchConfig {
    let mut c = ArchConfig::trm_default(8, 8, 5);
    c.hidden_size = 64;
    c.num_heads = 2;
    c.l_layers = 2;
    c.h_cycles = 1;
    c.l_cycles = 2;
    c.puzzle_emb_ndim = 64;
    c.puzzle_emb_len = 1;
    c.halt_exploration_prob = 0.0;
    c
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        adam: AdamAtan2Config {
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.1,
        },
        ema_rate: Some(0.999),
        puzzle_emb_weight_decay: 0.1,
    }
}

fn params(arch: &ArchConfig, seed: u64) -> Params<f32> {
    let mut p = Params::from_weights(arch, &Weights::init(arch, seed)).expect("init");
    // Non-zero Q head and puzzle rows, so every gradient is non-zero.
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for x in p.q_w.iter_mut().chain(p.puzzle_emb.iter_mut()) {
        *x = rng.gen_range(-0.1..0.1);
    }
    p
}

type Data = (Vec<i32>, Vec<i32>, Vec<i32>);

/// ACT steps from fresh carries; the losses.
fn train(
    engine: &mut GpuEngine,
    arch: &ArchConfig,
    data: &[Data],
    coll: &dyn Collective,
) -> Vec<f64> {
    let mut losses = Vec::new();
    for (i, (inputs, labels, ids)) in data.iter().enumerate() {
        let b = ids.len();
        engine.reset_halted(&vec![true; b]).expect("reset");
        let batch = Batch {
            inputs,
            labels,
            puzzle_ids: ids,
            b,
        };
        let r = act::act_step(engine, arch, &batch, &vec![1; b], None).expect("ACT step");
        losses.push(r.loss.loss);
        let up = OptimStep {
            grad_scale: 1.0 / (2 * b) as f32,
            lr: 1e-3 * (1.0 + i as f64),
            puzzle_emb_lr: 1e-2,
            update_dense: true,
        };
        engine
            .optimizer_step(&up, ids, coll)
            .expect("optimizer step");
    }
    losses
}

// --- the mirror fake -----------------------------------------------------------

/// `n` ranks holding the same data, on the emulator: the host side.
struct Mirror {
    n: usize,
    device: Option<Arc<MirrorDevice>>,
}

/// The device side, recording what was started.
struct MirrorDevice {
    n: usize,
    /// The ranges reduced, in order, with the number of finishes before each.
    log: Mutex<Vec<(Range<usize>, usize)>>,
    finishes: Mutex<usize>,
}

impl Collective for Mirror {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        self.n
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        buf.iter_mut().for_each(|x| *x *= self.n as f32);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CollectiveError> {
        buf.iter_mut().for_each(|x| *x *= self.n as f64);
        Ok(())
    }
    fn all_gather_rows(
        &self,
        ids: &[i32],
        rows: &[f32],
    ) -> Result<(Vec<i32>, Vec<f32>), CollectiveError> {
        Ok((ids.repeat(self.n), rows.repeat(self.n)))
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(vec![mine.to_vec(); self.n])
    }
    fn device(&self) -> Option<Arc<dyn DeviceCollective>> {
        self.device.clone().map(|d| d as Arc<dyn DeviceCollective>)
    }
}

impl MirrorDevice {
    fn gather<T: trm::backend::cuda::Elem>(
        &self,
        dev: &Device,
        part: &Buffer<T>,
        count: usize,
        out: &Buffer<T>,
    ) {
        let host = dev.download(part).expect("download");
        let all = host[..count].repeat(self.n);
        dev.write(out, &all).expect("write");
    }
}

impl DeviceCollective for MirrorDevice {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        self.n
    }
    fn start_all_reduce(
        &self,
        dev: &Device,
        buf: &Buffer<f32>,
        range: Range<usize>,
    ) -> Result<(), CollectiveError> {
        let v = dev
            .download_range(buf, range.start, range.len())
            .expect("download");
        let scaled: Vec<f32> = v.iter().map(|x| x * self.n as f32).collect();
        dev.write_at(buf, range.start, &scaled).expect("write");
        self.log
            .lock()
            .unwrap()
            .push((range, *self.finishes.lock().unwrap()));
        Ok(())
    }
    fn start_all_gather_i32(
        &self,
        dev: &Device,
        part: &Buffer<i32>,
        count: usize,
        out: &Buffer<i32>,
    ) -> Result<(), CollectiveError> {
        self.gather(dev, part, count, out);
        Ok(())
    }
    fn start_all_gather_f32(
        &self,
        dev: &Device,
        part: &Buffer<f32>,
        count: usize,
        out: &Buffer<f32>,
    ) -> Result<(), CollectiveError> {
        self.gather(dev, part, count, out);
        Ok(())
    }
    fn finish(&self, _dev: &Device) -> Result<(), CollectiveError> {
        *self.finishes.lock().unwrap() += 1;
        Ok(())
    }
}

/// The bucketed device reduction, started during the backward, gives the
/// bits of the host reduction after it, over several steps (the first step
/// reduces the whole buffer at the optimizer: the engine learns of the
/// device side there).
#[test]
fn device_buckets_match_the_host_reduction_emu() {
    let arch = config();
    let b = 2;
    let data: Vec<Data> = (0..3).map(|i| rand_batch(&arch, b, 50 + i)).collect();
    let new_engine = || {
        let mut e = GpuEngine::new(
            Device::Emu,
            arch.clone(),
            params(&arch, 7),
            b,
            engine_config(),
        )
        .expect("engine");
        e.set_min_bucket_bytes(0);
        e
    };
    let (mut host, mut device) = (new_engine(), new_engine());
    let plan: Vec<_> = device.bucket_plan().buckets.clone();
    assert_eq!(
        plan.iter().map(|b| b.ready).collect::<Vec<_>>(),
        vec![Ready::Layer(1), Ready::Layer(0), Ready::End],
        "one bucket per layer, the prefix last"
    );
    let mirror_host = Mirror { n: 2, device: None };
    let side = Arc::new(MirrorDevice {
        n: 2,
        log: Mutex::new(Vec::new()),
        finishes: Mutex::new(0),
    });
    let mirror_device = Mirror {
        n: 2,
        device: Some(side.clone()),
    };
    let lh = train(&mut host, &arch, &data, &mirror_host);
    let ld = train(&mut device, &arch, &data, &mirror_device);
    assert_eq!(lh, ld, "losses");
    let (a, c) = (host.export_state().unwrap(), device.export_state().unwrap());
    assert!(
        a.params.lm_head != params(&arch, 7).lm_head,
        "training moved nothing"
    );
    assert_eq!(a.params, c.params, "weights (puzzle table included)");
    assert_eq!(a.adam_m, c.adam_m);
    assert_eq!(a.adam_v, c.adam_v);
    assert_eq!(a.ema, c.ema);
    // Step 1: the whole buffer at the optimizer; then each step the
    // buckets in plan order, all before that step's finish.
    let log = side.log.lock().unwrap();
    let len = plan.iter().map(|b| b.range.end).max().unwrap();
    assert_eq!(log[0], (0..len, 0));
    assert_eq!(log.len(), 1 + 2 * plan.len(), "{log:?}");
    for step in 0..2 {
        for (k, bucket) in plan.iter().enumerate() {
            assert_eq!(
                log[1 + step * plan.len() + k],
                (bucket.range.clone(), step + 1)
            );
        }
    }
    assert_eq!(*side.finishes.lock().unwrap(), 3);
}

/// One rank through the device path changes nothing: the same bits as the
/// single process (and so the world size adds no cost but the calls).
#[test]
fn one_mirrored_rank_is_the_single_process_emu() {
    let arch = config();
    let b = 2;
    let data: Vec<Data> = (0..2).map(|i| rand_batch(&arch, b, 70 + i)).collect();
    let new_engine = || {
        GpuEngine::new(
            Device::Emu,
            arch.clone(),
            params(&arch, 9),
            b,
            engine_config(),
        )
        .expect("engine")
    };
    let (mut single, mut device) = (new_engine(), new_engine());
    let side = Arc::new(MirrorDevice {
        n: 1,
        log: Mutex::new(Vec::new()),
        finishes: Mutex::new(0),
    });
    let one = Mirror {
        n: 1,
        device: Some(side),
    };
    assert_eq!(
        train(&mut single, &arch, &data, &SingleProcess),
        train(&mut device, &arch, &data, &one)
    );
    assert_eq!(
        single.export_state().unwrap().params,
        device.export_state().unwrap().params
    );
}

/// The ARC config's flat gradient buffer: buckets per layer over the
/// whole buffer, the layers of several MB each.
#[test]
fn arc_config_bucket_plan() {
    let mut arch = ArchConfig::trm_default(900, 12, 1000);
    arch.hidden_size = 512;
    arch.num_heads = 8;
    arch.l_layers = 2;
    arch.h_cycles = 3;
    arch.l_cycles = 6;
    arch.puzzle_emb_ndim = 512;
    let e = GpuEngine::new(
        Device::Emu,
        arch.clone(),
        params(&arch, 1),
        1,
        engine_config(),
    )
    .expect("engine");
    let p = e.bucket_plan();
    let ready: Vec<_> = p.buckets.iter().map(|b| b.ready).collect();
    assert_eq!(ready, vec![Ready::Layer(1), Ready::Layer(0), Ready::End]);
    for b in &p.buckets[..2] {
        assert!(b.range.len() * 4 > 4 << 20, "{b:?}");
    }
    println!("ARC gradient buckets: {:?}", p.buckets);
}

// --- NCCL on one GPU -------------------------------------------------------------

/// A GPU and NCCL, or `None` (printed) when this machine has neither and
/// TRM_REQUIRE_GPU is not 1.
fn nccl_world_of_one() -> Option<(Dev, NcclCollective)> {
    let dev = Dev::gpu()?;
    let required = std::env::var("TRM_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match NcclCollective::join(&World::single(), 0, Duration::from_secs(60)) {
        Ok(c) => Some((dev, c)),
        Err(e) if !required => {
            eprintln!("NCCL not usable here: NCCL variant not run ({e})");
            None
        }
        Err(e) => panic!("NCCL required (TRM_REQUIRE_GPU=1): {e}"),
    }
}

#[test]
fn nccl_world_of_one_end_to_end_gpu() {
    let Some((dev, nccl)) = nccl_world_of_one() else {
        return;
    };
    println!("{}", trm::dist::nccl::library_summary().expect("loaded"));
    let dc = nccl.device().expect("NCCL has a device side");
    assert_eq!((dc.rank(), dc.world_size()), (0, 1));
    // Host collectives.
    let mut sums = [1.5f64, -2.25, 1e300];
    nccl.all_reduce_sum_f64(&mut sums).expect("f64 all-reduce");
    assert_eq!(sums, [1.5, -2.25, 1e300]);
    let mut f = [0.5f32, 3.0];
    nccl.all_reduce_sum(&mut f).expect("f32 all-reduce");
    assert_eq!(f, [0.5, 3.0]);
    assert_eq!(
        nccl.all_gather_bytes(b"abc").unwrap(),
        vec![b"abc".to_vec()]
    );
    assert_eq!(
        nccl.all_gather_rows(&[4, 1], &[1.0, 2.0, 3.0, 4.0])
            .unwrap(),
        (vec![4, 1], vec![1.0, 2.0, 3.0, 4.0])
    );
    // The all-reduce of a buffer of the ARC config's gradient size (7.6 M
    // values), on the device: equal to its input with one rank.
    let n = 7_630_000;
    let host: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.001 - 0.3).collect();
    let buf = dev.upload(&host);
    dc.start_all_reduce(dev.device(), &buf, 0..n)
        .expect("start");
    dc.finish(dev.device()).expect("finish");
    assert!(
        dev.download(&buf) == host,
        "a world of one changed the values"
    );

    // Training: the NCCL path (device buckets) against the single process.
    let arch = config();
    let b = 4;
    let data: Vec<Data> = (0..4).map(|i| rand_batch(&arch, b, 90 + i)).collect();
    let new_engine = || {
        let d = Device::gpu(0).expect("GPU 0");
        let mut e =
            GpuEngine::new(d, arch.clone(), params(&arch, 11), b, engine_config()).expect("engine");
        e.set_min_bucket_bytes(0);
        e
    };
    let (mut single, mut multi) = (new_engine(), new_engine());
    let ls = train(&mut single, &arch, &data[..3], &SingleProcess);
    let lm = train(&mut multi, &arch, &data[..3], &nccl);
    println!("losses: single {ls:?}, NCCL {lm:?}");
    let (a, c) = (
        single.export_state().unwrap(),
        multi.export_state().unwrap(),
    );
    let rel = |x: &[f32], y: &[f32]| {
        let num: f64 = x
            .iter()
            .zip(y)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum();
        let den: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    for (i, (x, y)) in ls.iter().zip(&lm).enumerate() {
        assert!(
            (x - y).abs() <= 1e-3 * x.abs(),
            "step {i}: loss {y} with NCCL, {x} without"
        );
    }
    let e = rel(&c.params.lm_head, &a.params.lm_head)
        .max(rel(&c.params.layers[0].qkv, &a.params.layers[0].qkv))
        .max(rel(&c.params.puzzle_emb, &a.params.puzzle_emb))
        .max(rel(&c.adam_v, &a.adam_v));
    println!(
        "NCCL against single process: largest relative difference {e:.2e} (bit-identical: {})",
        a.params == c.params
    );
    assert!(e < 4e-3, "weights differ by {e:.3e} (bf16 tolerance 4e-3)");
    // A checkpoint: the state exported and imported into a fresh engine
    // goes on exactly as the original.
    let mut resumed = new_engine();
    resumed.import_state(c.clone()).expect("import");
    let l1 = train(&mut multi, &arch, &data[3..], &nccl);
    let l2 = train(&mut resumed, &arch, &data[3..], &nccl);
    assert_eq!(l1, l2, "the resumed engine's loss");
    assert_eq!(
        multi.export_state().unwrap().params,
        resumed.export_state().unwrap().params,
        "the resumed engine's weights"
    );
}
