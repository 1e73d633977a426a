//! The CPU emulator of the CUDA kernels (feature `emu`, which the tests turn
//! on): build.rs compiles the same `kernels/*.cu` with the host C++ compiler
//! and `kernels/emu/cuda_emu.h` into a static library, with one entry point per
//! kernel, and [`launch`] runs a kernel there. CUDA threads are fibers, so
//! barriers and warp collectives behave as on the GPU, and misuse (a barrier
//! some threads never reach, mismatched collectives) is an [`EmuError`], not a
//! hang. See `kernels/emu/cuda_emu.h` for the model and its rules.
//!
//! "Device" pointers in the argument structs are host pointers here.

use std::ffi::{c_char, c_int, c_void, CStr};

use super::abi::{Kernel, KernelArgs, LaunchConfig};

/// Errors of an emulated launch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmuError {
    /// The kernel is not in the emulator library (not in kernels/*.cu when
    /// this crate was built).
    #[error("kernel {0:?} has no emulator entry point in this build")]
    UnknownKernel(String),
    /// Grid, block or shared memory outside the GPU's limits.
    #[error("emulated launch of {kernel}: invalid configuration: {message}")]
    InvalidConfig { kernel: String, message: String },
    /// A barrier or warp collective some threads can never reach.
    #[error("emulated launch of {kernel}: {message}")]
    Deadlock { kernel: String, message: String },
    /// A warp collective used against its rules (mask, width, source lane).
    #[error("emulated launch of {kernel}: warp collective misuse: {message}")]
    WarpMisuse { kernel: String, message: String },
    /// The kernel executed `__trap()`.
    #[error("emulated launch of {kernel}: {message}")]
    Trap { kernel: String, message: String },
    /// An address an instruction cannot use, where the GPU would fault or
    /// misbehave: a misaligned or non-shared `ldmatrix` row or `cp.async`
    /// operand.
    #[error("emulated launch of {kernel}: bad address: {message}")]
    BadAddress { kernel: String, message: String },
    /// The emulator itself failed (memory for stacks or shared memory).
    #[error("emulated launch of {kernel}: emulator failure: {message}")]
    Host { kernel: String, message: String },
}

/// Shared memory one block may use (static plus dynamic): the opt-in
/// maximum of sm_90, as `kMaxSharedPerBlock` in `kernels/emu/runtime.cpp`.
pub const MAX_SHARED_PER_BLOCK: u32 = 227 * 1024;

/// The kernel's static shared memory as ptxas reported it for the GPU build
/// (the most of any architecture; 0 for a kernel not in the report, or a
/// build without nvcc), so the emulator applies the GPU's static + dynamic
/// limit.
pub fn static_shared_bytes(kernel: &str) -> u32 {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static TABLE: OnceLock<HashMap<String, u32>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table: HashMap<String, u32> = HashMap::new();
        for k in super::ptxas_report().unwrap_or_default() {
            let most = table.entry(k.kernel).or_default();
            *most = (*most).max(k.shared_bytes);
        }
        table
    });
    table.get(kernel).copied().unwrap_or(0)
}

/// How the emulator schedules a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EmuOptions {
    /// Run blocks, and threads within a block, last to first. A kernel whose
    /// result depends on the order (a race) differs between the two orders.
    pub reverse_order: bool,
    /// Plants a missing barrier for a test: every `__syncthreads` at this
    /// source line (of any file of the kernel) returns at once.
    pub skip_barrier_line: Option<u32>,
    /// The shared memory a block may use, to emulate a smaller GPU (99 KiB:
    /// sm_86, sm_89) than the default [`MAX_SHARED_PER_BLOCK`]; launchers
    /// plan for it through `Device::max_shared_per_block`.
    pub max_shared_per_block: Option<u32>,
}

/// The `TrmEmuLaunch` struct of `kernels/emu/emu_abi.h`.
mod ffi {
    use super::super::abi::KernelArgs;
    include!(concat!(env!("OUT_DIR"), "/emu_abi.rs"));

    pub(crate) type EntryFn = unsafe extern "C" fn(
        *const TrmEmuLaunch,
        *const ::core::ffi::c_void,
        *mut ::core::ffi::c_char,
        usize,
    ) -> ::core::ffi::c_int;

    include!(concat!(env!("OUT_DIR"), "/emu_entries.rs"));
}

/// Argument structs and kernels of the emulator's own tests
/// (`kernels/emu/tests/`), which only exist in the emulator.
pub mod selftest {
    use super::super::abi::{Kernel, KernelArgs};
    include!(concat!(env!("OUT_DIR"), "/emu_selftest_abi.rs"));
}

thread_local! {
    /// The options of [`launch`] on this thread (see [`with_options`]).
    static THREAD_OPTIONS: std::cell::Cell<EmuOptions> = const {
        std::cell::Cell::new(EmuOptions {
            reverse_order: false,
            skip_barrier_line: None,
            max_shared_per_block: None,
        })
    };
}

/// Runs `f` with every [`launch`] this thread makes (the typed launchers'
/// too) under `options`, then restores the previous ones. Emulated launches
/// run on the calling thread, so tests running in parallel are unaffected.
pub fn with_options<R>(options: EmuOptions, f: impl FnOnce() -> R) -> R {
    let previous = THREAD_OPTIONS.with(|o| o.replace(options));
    struct Restore(EmuOptions);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_OPTIONS.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(previous);
    f()
}

/// The shared memory per block of this thread's emulated device
/// ([`EmuOptions::max_shared_per_block`], else [`MAX_SHARED_PER_BLOCK`]).
pub fn max_shared_per_block() -> u32 {
    THREAD_OPTIONS.with(|o| o.get().max_shared_per_block.unwrap_or(MAX_SHARED_PER_BLOCK))
}

/// Launches `kernel` on the CPU with this thread's options (the default
/// schedule unless inside [`with_options`]).
///
/// # Safety
/// Every pointer in `args` must be valid for the reads and writes the kernel
/// makes with this configuration, as for a GPU launch.
pub unsafe fn launch<A: KernelArgs>(
    kernel: Kernel<A>,
    cfg: &LaunchConfig,
    args: &A,
) -> Result<(), EmuError> {
    launch_with(kernel, cfg, args, THREAD_OPTIONS.with(|o| o.get()))
}

/// [`launch`] with scheduling options.
///
/// # Safety
/// As for [`launch`].
pub unsafe fn launch_with<A: KernelArgs>(
    kernel: Kernel<A>,
    cfg: &LaunchConfig,
    args: &A,
    options: EmuOptions,
) -> Result<(), EmuError> {
    let name = kernel.name();
    let entry = ffi::entry(name).ok_or_else(|| EmuError::UnknownKernel(name.to_string()))?;
    let request = ffi::TrmEmuLaunch {
        grid_x: cfg.grid.x,
        grid_y: cfg.grid.y,
        grid_z: cfg.grid.z,
        block_x: cfg.block.x,
        block_y: cfg.block.y,
        block_z: cfg.block.z,
        shared_bytes: cfg.shared_bytes,
        static_shared_bytes: static_shared_bytes(name),
        flags: if options.reverse_order { 1 } else { 0 },
        skip_barrier_line: options.skip_barrier_line.unwrap_or(0),
    };
    let mut message = [0 as c_char; 1024];
    // SAFETY: the entry reads `request` and `*args` (its own argument type,
    // by the generated `Kernel<A>`) during the call; the caller vouches for
    // the pointers inside `args`; `message` is writable for its length.
    let code: c_int = unsafe {
        entry(
            &request,
            (args as *const A).cast::<c_void>(),
            message.as_mut_ptr(),
            message.len(),
        )
    };
    // SAFETY: the runtime always NUL-terminates within the buffer (snprintf);
    // the buffer was zeroed, so it is terminated even if nothing was written.
    let message = unsafe { CStr::from_ptr(message.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let kernel = name.to_string();
    match code {
        0 => Ok(()),
        1 => Err(EmuError::InvalidConfig { kernel, message }),
        2 => Err(EmuError::Deadlock { kernel, message }),
        3 => Err(EmuError::WarpMisuse { kernel, message }),
        4 => Err(EmuError::Trap { kernel, message }),
        6 => Err(EmuError::BadAddress { kernel, message }),
        _ => Err(EmuError::Host { kernel, message }),
    }
}

/// Whether the emulator library has an entry point for the kernel `name`
/// (every kernel of [`super::abi::ALL_KERNELS`] and the self-tests do).
pub fn has_entry(name: &str) -> bool {
    ffi::entry(name).is_some()
}
