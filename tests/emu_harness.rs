//! The CPU emulator of the CUDA kernels, tested on its own kernels
//! (`kernels/emu/tests/selftest.cu`): warp shuffles and votes against their
//! CUDA definitions for every lane, a block reduction with and without its
//! barriers (a planted race), barrier and collective misuse reported as
//! errors, atomics across blocks, and bf16 rounding; and the warp-level
//! matrix wrappers of `kernels/arch.cuh` (`kernels/emu/tests/matrix.cu`):
//! mma and ldmatrix against the PTX ISA's fragment layouts, written out
//! independently here, and a tiled cp.async + ldmatrix + mma GEMM against a
//! CPU product. The matrix tests that do not rely on the emulator's misuse
//! reports also have `_gpu` variants: the same kernels, compiled by nvcc,
//! on GPU 0 (the only check of the wrappers on hardware).

mod device;

use device::Dev;
use half::bf16;
use trm::backend::cuda::abi::{Kernel, KernelArgs, LaunchConfig, ALL_KERNELS};
use trm::backend::cuda::emu::selftest::*;
use trm::backend::cuda::emu::{self, selftest, EmuError, EmuOptions};

/// Launches a self-test kernel, whose pointers the caller keeps alive.
fn run<A: KernelArgs>(
    kernel: Kernel<A>,
    cfg: LaunchConfig,
    args: &A,
    options: EmuOptions,
) -> Result<(), EmuError> {
    // SAFETY: every test passes pointers to live buffers sized for its launch.
    unsafe { emu::launch_with(kernel, &cfg, args, options) }
}

/// Launches a self-test kernel on `dev` and waits: on the emulator with
/// `options`, its errors returned (the misuse tests check them); on a GPU,
/// where `options` mean nothing, any error fails the test.
fn launch_on<A: KernelArgs>(
    dev: &Dev,
    kernel: Kernel<A>,
    cfg: LaunchConfig,
    args: &A,
    options: EmuOptions,
) -> Result<(), EmuError> {
    if dev.device().as_gpu().is_none() {
        return run(kernel, cfg, args, options);
    }
    dev.run(kernel, cfg, args);
    Ok(())
}

/// Tolerance factor for sums of products on `dev`: 1 on the emulator, which
/// rounds each exact sum once; 16 on a GPU, whose tensor cores may truncate
/// and add in blocks of unspecified order (still far below the O(1) errors
/// of a wrong fragment layout, which the exact integer cases pin down).
fn rounding_slack(dev: &Dev) -> f64 {
    if dev.device().as_gpu().is_some() {
        16.0
    } else {
        1.0
    }
}

/// u32 words in an i32 buffer (the bits unchanged): buffers hold i32, not u32.
fn upload_u32(dev: &Dev, words: &[u32]) -> trm::backend::cuda::Buffer<i32> {
    dev.upload(&words.iter().map(|&w| w as i32).collect::<Vec<_>>())
}

#[test]
fn the_self_test_kernels_are_embedded_for_the_gpu() {
    use trm::backend::cuda::{kernels_compiled, module};
    if !kernels_compiled() {
        assert!(
            std::env::var("TRM_REQUIRE_KERNELS").map_or(true, |v| v != "1"),
            "TRM_REQUIRE_KERNELS=1 but this build has no CUDA kernels"
        );
        return;
    }
    // What a GPU launch of a self-test kernel looks up (the `_gpu` tests).
    for &(m, name, _) in selftest::ALL_KERNELS {
        let embedded = module(m).unwrap_or_else(|e| panic!("{name}: {e}"));
        let targets: Vec<&str> = embedded.images.iter().map(|i| i.target).collect();
        assert_eq!(targets, trm::backend::cuda::targets_built(), "{m}: images");
        for image in embedded.images {
            let data = image.data;
            let at = format!("{m} ({})", image.target);
            if image.target.starts_with("sm_") {
                assert!(data.starts_with(b"\x7fELF"), "{at}: not an ELF image");
                assert_eq!(data.as_ptr() as usize % 16, 0, "{at}: not 16-byte aligned");
            }
            assert!(
                data.windows(name.len()).any(|w| w == name.as_bytes()),
                "{name} is not in {at}"
            );
        }
    }
}

/// Thread t's value in `emu_warp_ops`.
fn value(block: u32, t: u32) -> i32 {
    (1000 * block + 10 * t + 1) as i32
}

/// The expected result of lane `lane` per the CUDA programming guide's
/// definitions (written independently of the emulator's PTX formulation).
fn expected(
    op: i32,
    arg: i32,
    width: i32,
    mask: u32,
    block: u32,
    warp_base: u32,
    lane: i32,
) -> i32 {
    let own = value(block, warp_base + lane as u32);
    let at = |l: i32| value(block, warp_base + l as u32);
    let group = lane / width * width;
    match op {
        // srcLane outside 0..width reads srcLane modulo width within the group
        0 => at(group + (lane * arg + 1).rem_euclid(width)),
        // up: lane - delta, own value if before the group's first lane
        1 => {
            let src = lane - arg;
            if src < group {
                own
            } else {
                at(src)
            }
        }
        // down: lane + delta, own value past the group's last lane
        2 => {
            let src = lane + arg;
            if src >= group + width {
                own
            } else {
                at(src)
            }
        }
        // xor: may read earlier groups; a later group gives the own value
        3 => {
            let src = lane ^ arg;
            if src >= group + width {
                own
            } else {
                at(src)
            }
        }
        4 => {
            let mut bits = 0u32;
            for l in 0..32 {
                if mask >> l & 1 == 1 && at(l) % arg == 0 {
                    bits |= 1 << l;
                }
            }
            bits as i32
        }
        5 => ((0..32).any(|l| mask >> l & 1 == 1 && l == arg)) as i32,
        6 => ((0..32).all(|l| mask >> l & 1 == 0 || l != arg)) as i32,
        7 => (0..32)
            .filter(|l| mask >> l & 1 == 1)
            .map(at)
            .fold(0u32, |s, v| s.wrapping_add(v as u32)) as i32,
        _ => own,
    }
}

#[test]
fn every_abi_kernel_has_an_emulator_entry() {
    assert!(!ALL_KERNELS.is_empty());
    for (module, kernel, _) in ALL_KERNELS {
        assert!(emu::has_entry(kernel), "{module}.cu: {kernel}");
    }
    assert!(!emu::has_entry("no_such_kernel"));
}

#[test]
fn shuffles_and_votes_match_their_definitions_for_every_lane() {
    let (blocks, threads) = (2u32, 64u32);
    let mut cases = Vec::new();
    for width in [32, 16, 8, 4, 2, 1] {
        for arg in [0, 1, 2, 3, 5, 7, 16, 31] {
            for op in 0..4 {
                cases.push((op, arg, width, u32::MAX));
            }
        }
    }
    for arg in [1, 2, 3, 7] {
        cases.push((4, arg, 32, u32::MAX));
    }
    for arg in [0, 9, 31] {
        cases.push((5, arg, 32, u32::MAX));
        cases.push((6, arg, 32, u32::MAX));
    }
    cases.push((7, 0, 32, u32::MAX));
    // partial masks: the upper half of each warp, and every other lane
    cases.push((4, 3, 32, 0xffff_0000));
    cases.push((5, 20, 32, 0xffff_0000));
    cases.push((6, 20, 32, 0x5555_5555));
    cases.push((7, 0, 32, 0x5555_5555));
    cases.push((8, 0, 32, 0x0f0f_0f0f));
    cases.push((3, 16, 32, 0xffff_0000 | 0x0000_ffff));
    for &(op, arg, width, mask) in &cases {
        let mut out = vec![0i32; (blocks * threads) as usize];
        let args = WarpOpsArgs {
            out: out.as_mut_ptr(),
            op,
            arg,
            width,
            mask,
        };
        run(
            EMU_WARP_OPS,
            LaunchConfig::linear(blocks, threads, 0),
            &args,
            EmuOptions::default(),
        )
        .unwrap_or_else(|e| panic!("op {op} arg {arg} width {width}: {e}"));
        for b in 0..blocks {
            for t in 0..threads {
                let lane = (t % 32) as i32;
                let want = if mask >> lane & 1 == 1 {
                    expected(op, arg, width, mask, b, t / 32 * 32, lane)
                } else {
                    -1
                };
                assert_eq!(
                    out[(b * threads + t) as usize],
                    want,
                    "op {op} arg {arg} width {width} mask {mask:#x} block {b} thread {t}"
                );
            }
        }
    }
}

fn block_sum(x: &[f32], use_barrier: bool, use_dynamic: bool, reverse: bool) -> Vec<f32> {
    let blocks = x.len() / 256;
    let mut out = vec![0.0f32; blocks];
    let args = BlockSumArgs {
        x: x.as_ptr(),
        out: out.as_mut_ptr(),
        use_barrier: use_barrier as i32,
        use_dynamic: use_dynamic as i32,
    };
    let smem = if use_dynamic { 1024 } else { 0 };
    run(
        EMU_BLOCK_SUM,
        LaunchConfig::linear(blocks as u32, 256, smem),
        &args,
        EmuOptions {
            reverse_order: reverse,
            ..EmuOptions::default()
        },
    )
    .unwrap();
    out
}

#[test]
fn block_reduction_with_barriers_is_exact_and_without_them_is_caught() {
    let blocks = 3;
    let x: Vec<f32> = (0..256 * blocks).map(|i| ((i * 37) % 101) as f32).collect();
    let exact: Vec<f32> = x.chunks(256).map(|c| c.iter().sum()).collect();
    for dynamic in [false, true] {
        for reverse in [false, true] {
            assert_eq!(block_sum(&x, true, dynamic, reverse), exact);
        }
        // The planted race: thread 0 runs ahead and reads partial sums that
        // were never written, which the emulator's shared-memory poison makes NaN.
        let raced = block_sum(&x, false, dynamic, false);
        assert!(
            raced.iter().all(|v| v.is_nan()),
            "race not visible (dynamic shared {dynamic}): {raced:?}"
        );
    }
}

fn misuse(mode: i32, threads: u32) -> Result<Vec<i32>, EmuError> {
    let mut out = vec![0i32; threads as usize];
    let args = MisuseArgs {
        out: out.as_mut_ptr(),
        mode,
    };
    run(
        EMU_MISUSE,
        LaunchConfig::linear(2, threads, 0),
        &args,
        EmuOptions::default(),
    )?;
    Ok(out)
}

#[test]
fn barrier_and_collective_misuse_are_errors_not_hangs() {
    let err = misuse(0, 128).unwrap_err();
    assert!(matches!(err, EmuError::Deadlock { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("emu_misuse")
            && text.contains("reached by 100 of 128 threads")
            && text.contains("28 threads have returned"),
        "{text}"
    );

    let err = misuse(1, 64).unwrap_err();
    assert!(matches!(err, EmuError::Deadlock { .. }), "{err}");
    assert!(err.to_string().contains("divergent barriers"), "{err}");

    let err = misuse(2, 64).unwrap_err();
    assert!(matches!(err, EmuError::Deadlock { .. }), "{err}");
    assert!(err.to_string().contains("lane 5 has returned"), "{err}");

    let err = misuse(3, 32).unwrap_err();
    assert!(matches!(err, EmuError::WarpMisuse { .. }), "{err}");
    assert!(err.to_string().contains("mismatched"), "{err}");

    let err = misuse(4, 32).unwrap_err();
    assert!(matches!(err, EmuError::Trap { .. }), "{err}");
    assert!(err.to_string().contains("thread (3,0,0)"), "{err}");

    assert_eq!(misuse(5, 96).unwrap()[0], 48);

    let err = misuse(6, 32).unwrap_err();
    assert!(matches!(err, EmuError::WarpMisuse { .. }), "{err}");
    assert!(err.to_string().contains("reads lane 16"), "{err}");

    let err = misuse(7, 40).unwrap_err();
    assert!(matches!(err, EmuError::WarpMisuse { .. }), "{err}");
    assert!(err.to_string().contains("do not exist"), "{err}");
}

#[test]
fn bad_launch_configurations_are_rejected() {
    let mut out = vec![0i32; 2048];
    let args = MisuseArgs {
        out: out.as_mut_ptr(),
        mode: 5,
    };
    for cfg in [
        LaunchConfig::linear(1, 0, 0),
        LaunchConfig::linear(1, 1025, 0),
        LaunchConfig::linear(0, 32, 0),
        LaunchConfig::linear(1, 32, 228 * 1024),
    ] {
        let err = run(EMU_MISUSE, cfg, &args, EmuOptions::default()).unwrap_err();
        assert!(
            matches!(err, EmuError::InvalidConfig { .. }),
            "{cfg:?}: {err}"
        );
    }
    // More threads than the kernel's __launch_bounds__(256): the GPU refuses it too.
    let args = trm::backend::cuda::abi::RmsnormForwardArgs::default();
    // SAFETY: the launch is refused before any pointer is used.
    let err = unsafe {
        emu::launch(
            trm::backend::cuda::abi::RMSNORM_FORWARD_BF16,
            &LaunchConfig::linear(1, 512, 0),
            &args,
        )
    }
    .unwrap_err();
    assert!(
        matches!(err, EmuError::InvalidConfig { .. })
            && err.to_string().contains("__launch_bounds__(256)"),
        "{err}"
    );
}

#[test]
fn atomics_sum_across_blocks() {
    let n = 3000;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let (mut fsum, mut isum, mut usum, mut imax, mut cas) = (0.0f32, 0i32, 0u32, -1i32, 0i32);
    let args = AtomicsArgs {
        x: x.as_ptr(),
        fsum: &mut fsum,
        isum: &mut isum,
        usum: &mut usum,
        imax: &mut imax,
        cas_count: &mut cas,
        n,
    };
    run(
        EMU_ATOMICS,
        LaunchConfig::linear(5, 128, 0),
        &args,
        EmuOptions::default(),
    )
    .unwrap();
    assert_eq!(fsum, x.iter().sum::<f32>());
    assert_eq!(isum, (0..n).sum::<i32>());
    assert_eq!(usum, n as u32);
    assert_eq!(imax, (0..n).map(|i| i * 7919 % 1000).max().unwrap());
    assert_eq!(cas, n);
}

/// Round to nearest even on the 16 dropped bits; NaN to the canonical 0x7fff.
fn bf16_bits_by_definition(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return 0x7fff;
    }
    let (hi, lo) = (u >> 16, u & 0xffff);
    let up = lo > 0x8000 || (lo == 0x8000 && hi & 1 == 1);
    (hi + up as u32) as u16
}

#[test]
fn bf16_rounds_to_nearest_even_and_keeps_nan_and_inf() {
    let mut x: Vec<f32> = [
        0x3f80_8000u32, // 1 + 2^-8: a tie, rounds down to even 1.0
        0x3f81_8000,    // a tie, rounds up to the even 0x3f82
        0x3f80_8001,    // just above a tie
        0x3f80_7fff,    // just below a tie
        0xbf81_8000,    // negative tie
        0x0000_8000,    // subnormal tie -> 0
        0x0001_8000,    // subnormal tie -> 0x0002
        0x7f7f_ffff,    // f32 max rounds to +inf
        0x7f7f_7fff,    // stays finite
        0x7f80_0000,    // +inf
        0xff80_0000,    // -inf
        0x7fc0_0000,    // quiet NaN
        0x7f80_0001,    // signalling NaN
        0xffc0_1234,    // negative NaN with payload
        0x8000_0000,    // -0
    ]
    .iter()
    .map(|&b| f32::from_bits(b))
    .collect();
    // and a sweep of ordinary values
    x.extend((0..4000).map(|i| (i as f32 - 2000.0) * 0.01371 + 1e-3));
    let n = x.len();
    let mut y = vec![bf16::ZERO; n];
    let mut back = vec![0.0f32; n];
    let args = Bf16ConvertArgs {
        x: x.as_ptr(),
        y: y.as_mut_ptr(),
        back: back.as_mut_ptr(),
        n: n as i64,
    };
    run(
        EMU_BF16_CONVERT,
        LaunchConfig::linear(3, 64, 0),
        &args,
        EmuOptions::default(),
    )
    .unwrap();
    for i in 0..n {
        let want = bf16_bits_by_definition(x[i]);
        assert_eq!(y[i].to_bits(), want, "x = {:#010x}", x[i].to_bits());
        assert_eq!(back[i].to_bits(), (want as u32) << 16, "x = {}", x[i]);
        if !x[i].is_nan() {
            assert_eq!(y[i], bf16::from_f32(x[i]), "x = {}", x[i]);
        }
    }
    assert_eq!(y[0].to_bits(), 0x3f80);
    assert_eq!(y[1].to_bits(), 0x3f82);
    assert_eq!(y[7].to_bits(), 0x7f80);
    assert_eq!(y[13].to_bits(), 0x7fff);
}

// ---------------------------------------------------------------------------
// Warp-level matrix wrappers

/// (row, column) of element i of lane `lane`'s A fragment of mma.m16n8k16
/// (.bf16), as the PTX ISA states it.
fn frag_a(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 2 || (4..6).contains(&i) {
        group
    } else {
        group + 8
    };
    let col = if i < 4 {
        tig * 2 + (i & 1)
    } else {
        tig * 2 + (i & 1) + 8
    };
    (row, col)
}

/// (row, column) of element i of the B fragment (16 x 8, K x N).
fn frag_b(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 2 {
        tig * 2 + (i & 1)
    } else {
        tig * 2 + (i & 1) + 8
    };
    (row, group)
}

/// (row, column) of element i of the C and D fragments (16 x 8, f32).
fn frag_c(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = (lane >> 2, lane % 4);
    let row = if i < 2 { group } else { group + 8 };
    (row, tig * 2 + (i & 1))
}

/// Elements 2j and 2j + 1 of a fragment in register j, the lower in bits 0..15.
fn pack(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

/// One 16x8x16 product per warp: `a` 16x16, `b` 16x8 (K x N) and `c` 16x8
/// row-major per warp, laid out into per-lane fragments here; returns D per
/// warp, row-major, read back through the D layout.
fn mma_tiles(
    dev: &Dev,
    a: &[bf16],
    b: &[bf16],
    c: &[f32],
    mode: i32,
    threads: u32,
) -> Result<Vec<f32>, EmuError> {
    let warps = a.len() / 256;
    let (mut fa, mut fb, mut fc) = (
        vec![0u32; warps * 128],
        vec![0u32; warps * 64],
        vec![0f32; warps * 128],
    );
    for w in 0..warps {
        let (a, b, c) = (&a[w * 256..], &b[w * 128..], &c[w * 128..]);
        for lane in 0..32 {
            let t = w * 32 + lane;
            let at = |i| {
                let (r, k) = frag_a(lane, i);
                a[r * 16 + k]
            };
            let bt = |i| {
                let (k, n) = frag_b(lane, i);
                b[k * 8 + n]
            };
            for j in 0..4 {
                fa[t * 4 + j] = pack(at(2 * j), at(2 * j + 1));
                let (r, n) = frag_c(lane, j);
                fc[t * 4 + j] = c[r * 8 + n];
            }
            for j in 0..2 {
                fb[t * 2 + j] = pack(bt(2 * j), bt(2 * j + 1));
            }
        }
    }
    let (fa, fb, fc) = (upload_u32(dev, &fa), upload_u32(dev, &fb), dev.upload(&fc));
    let fd = dev.upload(&vec![f32::NAN; warps * 128]);
    let args = MmaFragmentsArgs {
        a: dev.cptr(&fa, 0).cast(),
        b: dev.cptr(&fb, 0).cast(),
        c: dev.cptr(&fc, 0),
        d: dev.ptr(&fd, 0),
        mode,
    };
    launch_on(
        dev,
        EMU_MMA_FRAGMENTS,
        LaunchConfig::linear(1, threads, 0),
        &args,
        EmuOptions::default(),
    )?;
    let fd = dev.download(&fd);
    let mut d = vec![f32::NAN; warps * 128];
    for w in 0..warps {
        for lane in 0..32 {
            for i in 0..4 {
                let (r, n) = frag_c(lane, i);
                d[w * 128 + r * 8 + n] = fd[(w * 32 + lane) * 4 + i];
            }
        }
    }
    Ok(d)
}

/// D = A B + C in f64 per warp, and sum |a b| + |c| per element (the scale of
/// its rounding error).
fn mma_reference(a: &[bf16], b: &[bf16], c: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let warps = a.len() / 256;
    let (mut d, mut scale) = (vec![0f64; warps * 128], vec![0f64; warps * 128]);
    for w in 0..warps {
        for r in 0..16 {
            for n in 0..8 {
                let o = w * 128 + r * 8 + n;
                d[o] = c[o] as f64;
                scale[o] = (c[o] as f64).abs();
                for k in 0..16 {
                    let p = a[w * 256 + r * 16 + k].to_f64() * b[w * 128 + k * 8 + n].to_f64();
                    d[o] += p;
                    scale[o] += p.abs();
                }
            }
        }
    }
    (d, scale)
}

on_both!(
    mma_computes_the_tile_product_in_the_documented_fragment_layouts_emu,
    mma_computes_the_tile_product_in_the_documented_fragment_layouts_gpu,
    mma_fragment_layouts
);

fn mma_fragment_layouts(dev: &Dev) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16816);
    let warps = 2;
    // Small integers: every sum is exact in f32, so D must match exactly.
    let a: Vec<bf16> = (0..warps * 256)
        .map(|_| bf16::from_f32(rng.gen_range(-8i32..=8) as f32))
        .collect();
    let b: Vec<bf16> = (0..warps * 128)
        .map(|_| bf16::from_f32(rng.gen_range(-8i32..=8) as f32))
        .collect();
    let c: Vec<f32> = (0..warps * 128)
        .map(|_| rng.gen_range(-100i32..=100) as f32)
        .collect();
    let d = mma_tiles(dev, &a, &b, &c, 0, 64).unwrap();
    let (want, _) = mma_reference(&a, &b, &c);
    for (i, (&got, &want)) in d.iter().zip(&want).enumerate() {
        assert_eq!(
            got as f64,
            want,
            "{}: element {i} (warp {}, row {}, col {})",
            dev.name(),
            i / 128,
            i % 128 / 8,
            i % 8
        );
    }

    // General values: the emulator rounds each exact sum once to f32, so the
    // error is at most 2^-24 of |c| + sum |a b|; allow twice that (times the
    // GPU's slack).
    let a: Vec<bf16> = (0..warps * 256)
        .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)))
        .collect();
    let b: Vec<bf16> = (0..warps * 128)
        .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)))
        .collect();
    let c: Vec<f32> = (0..warps * 128)
        .map(|_| rng.gen_range(-4.0f32..4.0))
        .collect();
    let d = mma_tiles(dev, &a, &b, &c, 0, 64).unwrap();
    let (want, scale) = mma_reference(&a, &b, &c);
    for i in 0..d.len() {
        let tol = rounding_slack(dev) * 2f64.powi(-23) * scale[i];
        assert!(
            (d[i] as f64 - want[i]).abs() <= tol,
            "{}: element {i}: {} vs {} (tolerance {tol:e})",
            dev.name(),
            d[i],
            want[i]
        );
    }
}

#[test]
fn divergent_or_partial_warp_mma_is_an_error() {
    let dev = &Dev::emu();
    let a = vec![bf16::ONE; 256];
    let b = vec![bf16::ONE; 128];
    let c = vec![0.0f32; 128];
    // Lanes 16..31 return instead of joining the mma.
    let err = mma_tiles(dev, &a, &b, &c, 1, 32).unwrap_err();
    assert!(matches!(err, EmuError::Deadlock { .. }), "{err}");
    assert!(err.to_string().contains("mma.sync.m16n8k16"), "{err}");
    // Lanes 16..31 call it from another line: not the same instruction.
    let err = mma_tiles(dev, &a, &b, &c, 2, 32).unwrap_err();
    assert!(matches!(err, EmuError::WarpMisuse { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("mismatched") && text.contains("matrix.cu:"),
        "{text}"
    );
    // A 48-thread block: warp 1 has 16 lanes, too few for an mma.
    let a = vec![bf16::ONE; 512];
    let b = vec![bf16::ONE; 256];
    let c = vec![0.0f32; 256];
    let err = mma_tiles(dev, &a, &b, &c, 0, 48).unwrap_err();
    assert!(matches!(err, EmuError::WarpMisuse { .. }), "{err}");
    assert!(err.to_string().contains("do not exist"), "{err}");
    // The same launch with whole warps succeeds: 16 * 1 * 1 per element.
    let d = mma_tiles(dev, &a, &b, &c, 0, 64).unwrap();
    assert!(d.iter().all(|&v| v == 16.0), "{d:?}");
}

/// Runs emu_ldmatrix on 64 rows of 8 u16 (`src`, held in a bf16 buffer for
/// the bits: a device allocation, 16-byte aligned as cp.async needs).
fn ldmatrix(
    dev: &Dev,
    src: &[u16; 512],
    slot: &[i32; 32],
    variant: i32,
    misuse: i32,
) -> Result<Vec<u32>, EmuError> {
    let rows = dev.upload(&src.map(bf16::from_bits));
    let slots = dev.upload(slot);
    let out = dev.zeros::<i32>(128);
    let args = LdmatrixArgs {
        src: dev.cptr(&rows, 0).cast(),
        slot: dev.cptr(&slots, 0),
        out: dev.ptr(&out, 0).cast(),
        variant,
        misuse,
    };
    launch_on(
        dev,
        EMU_LDMATRIX,
        LaunchConfig::linear(1, 32, 0),
        &args,
        EmuOptions::default(),
    )?;
    Ok(dev.download(&out).iter().map(|&w| w as u32).collect())
}

/// Distinct values with both bytes varying, and each lane's row: scattered
/// over the buffer, lane l points at row slot[l].
fn ldmatrix_inputs() -> ([u16; 512], [i32; 32]) {
    let src = std::array::from_fn(|i| (i as u16).wrapping_mul(40503) ^ 0x1357);
    let slot = std::array::from_fn(|l| ((l * 37 + 11) % 64) as i32);
    (src, slot)
}

on_both!(
    ldmatrix_gives_every_lane_its_documented_elements_emu,
    ldmatrix_gives_every_lane_its_documented_elements_gpu,
    ldmatrix_layouts
);

fn ldmatrix_layouts(dev: &Dev) {
    let (src, slot) = ldmatrix_inputs();
    for variant in 0..6 {
        let matrices = [1, 2, 4][variant as usize % 3];
        let trans = variant >= 3;
        let out = ldmatrix(dev, &src, &slot, variant, 0).unwrap();
        // Matrix j's row r is the row lane 8j + r points at.
        let element = |j: usize, r: usize, c: usize| src[slot[8 * j + r] as usize * 8 + c] as u32;
        for lane in 0..32 {
            for j in 0..4 {
                let want = if j >= matrices {
                    0xdead_beef
                } else if trans {
                    element(j, 2 * (lane % 4), lane / 4)
                        | element(j, 2 * (lane % 4) + 1, lane / 4) << 16
                } else {
                    element(j, lane / 4, 2 * (lane % 4))
                        | element(j, lane / 4, 2 * (lane % 4) + 1) << 16
                };
                assert_eq!(
                    out[lane * 4 + j],
                    want,
                    "{}: variant {variant} lane {lane} register {j}: {:#010x} vs {want:#010x}",
                    dev.name(),
                    out[lane * 4 + j]
                );
            }
        }
    }
}

#[test]
fn ldmatrix_on_a_misaligned_or_global_row_is_an_error() {
    let (src, slot) = ldmatrix_inputs();
    let dev = &Dev::emu();
    let err = ldmatrix(dev, &src, &slot, 2, 1).unwrap_err();
    assert!(matches!(err, EmuError::BadAddress { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("ldmatrix.x4")
            && text.contains("lane 3]")
            && text.contains("16-byte aligned"),
        "{text}"
    );
    let err = ldmatrix(dev, &src, &slot, 3, 2).unwrap_err();
    assert!(matches!(err, EmuError::BadAddress { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("lane 5]") && text.contains("not in shared memory"),
        "{text}"
    );
}

struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    b_kn: bool,
    vec_bytes: i32,
}

/// Runs emu_gemm_tile on random bf16 inputs; returns (c, reference in f64,
/// sum |a b| per element), c read back with 16 guard values after it.
#[allow(clippy::type_complexity)]
fn gemm_tile(
    dev: &Dev,
    g: &Gemm,
    skip_wait: bool,
    reverse: bool,
) -> Result<(Vec<f32>, Vec<f64>, Vec<f64>), EmuError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((g.m * 10_000 + g.n * 100 + g.k) as u64);
    let (m, n, k) = (g.m, g.n, g.k);
    let a: Vec<bf16> = (0..m * k)
        .map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect();
    let b: Vec<bf16> = (0..n * k)
        .map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect(); // [n][k]
    let stored: Vec<bf16> = if g.b_kn {
        (0..k * n).map(|i| b[(i % n) * k + i / n]).collect()
    } else {
        b.clone()
    };
    let mut c = vec![f32::NAN; m * n + 16];
    for v in &mut c[m * n..] {
        *v = 12345.0;
    }
    let (da, db, dc) = (dev.upload(&a), dev.upload(&stored), dev.upload(&c));
    let args = GemmTileArgs {
        a: dev.cptr(&da, 0),
        b: dev.cptr(&db, 0),
        c: dev.ptr(&dc, 0),
        m: m as i32,
        n: n as i32,
        k: k as i32,
        b_kn: g.b_kn as i32,
        vec_bytes: g.vec_bytes,
        skip_wait: skip_wait as i32,
    };
    let cfg = LaunchConfig {
        grid: trm::backend::cuda::abi::Dim3 {
            x: n.div_ceil(64) as u32,
            y: m.div_ceil(64) as u32,
            z: 1,
        },
        block: trm::backend::cuda::abi::Dim3 { x: 128, y: 1, z: 1 },
        shared_bytes: 0,
    };
    launch_on(
        dev,
        EMU_GEMM_TILE,
        cfg,
        &args,
        EmuOptions {
            reverse_order: reverse,
            ..EmuOptions::default()
        },
    )?;
    let mut c = dev.download(&dc);
    assert!(c[m * n..].iter().all(|&v| v == 12345.0), "write past c");
    c.truncate(m * n);
    let (mut want, mut scale) = (vec![0f64; m * n], vec![0f64; m * n]);
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let prod = a[i * k + p].to_f64() * b[j * k + p].to_f64();
                want[i * n + j] += prod;
                scale[i * n + j] += prod.abs();
            }
        }
    }
    Ok((c, want, scale))
}

on_both!(
    tiled_gemm_with_cp_async_ldmatrix_and_mma_matches_a_cpu_product_emu,
    tiled_gemm_with_cp_async_ldmatrix_and_mma_matches_a_cpu_product_gpu,
    tiled_gemm
);

fn tiled_gemm(dev: &Dev) {
    let cases = [
        // (m, n, k, b is [k][n], cp.async bytes): edges in m, n and k
        (77, 45, 72, false, 16),
        (50, 70, 52, false, 8),
        (33, 19, 46, false, 4),
        (64, 64, 32, false, 16),
        (77, 72, 40, true, 16),
        (130, 8, 16, true, 8),
        (65, 30, 34, true, 4),
    ];
    for (i, &(m, n, k, b_kn, vec_bytes)) in cases.iter().enumerate() {
        let g = Gemm {
            m,
            n,
            k,
            b_kn,
            vec_bytes,
        };
        let (c, want, scale) = gemm_tile(dev, &g, false, i % 2 == 1).unwrap();
        // Each mma rounds its exact sum once to f32 (error <= 2^-24 of the
        // sum so far, at most sum |a b|), once per 16 of k rounded up to the
        // 32-wide tiles; one rounding of slack.
        let roundings = (k.div_ceil(32) * 2 + 1) as f64;
        for e in 0..m * n {
            let tol = rounding_slack(dev) * roundings * 2f64.powi(-24) * scale[e];
            assert!(
                (c[e] as f64 - want[e]).abs() <= tol,
                "{}: m {m} n {n} k {k} b_kn {b_kn} vec {vec_bytes}: c[{}][{}] = {} vs {} (tolerance {tol:e})",
                dev.name(),
                e / n,
                e % n,
                c[e],
                want[e]
            );
        }
    }
}

#[test]
fn gemm_misuse_of_cp_async_is_caught() {
    // No cp_async_wait: the tiles are read before the copies land, which the
    // emulator makes visible as the NaN poison of unwritten shared memory.
    let g = Gemm {
        m: 40,
        n: 40,
        k: 40,
        b_kn: false,
        vec_bytes: 16,
    };
    let dev = &Dev::emu();
    let (c, _, _) = gemm_tile(dev, &g, true, false).unwrap();
    assert!(c.iter().all(|v| v.is_nan()), "{:?}", &c[..8]);
    // k = 36: rows of 72 bytes, so 16-byte copies are misaligned.
    let g = Gemm {
        m: 40,
        n: 40,
        k: 36,
        b_kn: false,
        vec_bytes: 16,
    };
    let err = gemm_tile(dev, &g, false, false).unwrap_err();
    assert!(matches!(err, EmuError::BadAddress { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("cp.async of 16 bytes")
            && text.contains("source")
            && text.contains("misaligned"),
        "{text}"
    );
}
