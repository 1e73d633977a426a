//! The CPU emulator of the CUDA kernels, tested on its own kernels
//! (`kernels/emu/tests/selftest.cu`): warp shuffles and votes against their
//! CUDA definitions for every lane, a block reduction with and without its
//! barriers (a planted race), barrier and collective misuse reported as
//! errors, atomics across blocks, and bf16 rounding.

use half::bf16;
use trm::backend::cuda::abi::{LaunchConfig, ALL_KERNELS};
use trm::backend::cuda::emu::selftest::*;
use trm::backend::cuda::emu::{self, EmuError, EmuOptions};

/// Launches a self-test kernel, whose pointers the caller keeps alive.
fn run<A: trm::backend::cuda::abi::KernelArgs>(
    kernel: trm::backend::cuda::abi::Kernel<A>,
    cfg: LaunchConfig,
    args: &A,
    options: EmuOptions,
) -> Result<(), EmuError> {
    // SAFETY: every test passes pointers to live buffers sized for its launch.
    unsafe { emu::launch_with(kernel, &cfg, args, options) }
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
