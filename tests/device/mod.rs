//! The launch targets of the kernel tests: one test body, run on the CPU
//! emulator always and on the GPU when there is one.
//!
//! `Dev` wraps the library's `Device` with methods that fail the test (with
//! the target's name) instead of returning errors, so bodies stay short.
//! Without a GPU, `Dev::gpu()` prints "no CUDA device: GPU variant not run"
//! and the GPU variant passes without asserting anything; with
//! TRM_REQUIRE_GPU=1 (tools/gpu-check.sh sets it on a machine with a GPU) a
//! missing GPU fails instead.
#![allow(dead_code)]

use trm::backend::cuda::abi::{Kernel, KernelArgs, LaunchConfig};
use trm::backend::cuda::{Buffer, CudaError, Device, Elem};

pub struct Dev(pub Device);

impl Dev {
    pub fn emu() -> Dev {
        Dev(Device::Emu)
    }

    /// GPU 0, or `None` when this machine has none (see the module docs).
    pub fn gpu() -> Option<Dev> {
        let required = std::env::var("TRM_REQUIRE_GPU").is_ok_and(|v| v == "1");
        match Device::gpu(0) {
            Ok(d) => Some(Dev(d)),
            Err(e @ CudaError::NoDevice(_)) if !required => {
                eprintln!("no CUDA device: GPU variant not run ({e})");
                None
            }
            Err(e) => panic!("GPU requested (TRM_REQUIRE_GPU={required}): {e}"),
        }
    }

    pub fn name(&self) -> String {
        self.0.name()
    }
    pub fn device(&self) -> &Device {
        &self.0
    }
    pub fn upload<T: Elem>(&self, host: &[T]) -> Buffer<T> {
        self.0
            .upload(host)
            .unwrap_or_else(|e| panic!("{}: upload: {e}", self.name()))
    }
    pub fn zeros<T: Elem>(&self, n: usize) -> Buffer<T> {
        self.0
            .zeros(n)
            .unwrap_or_else(|e| panic!("{}: zeros: {e}", self.name()))
    }
    pub fn download<T: Elem>(&self, buf: &Buffer<T>) -> Vec<T> {
        self.0
            .download(buf)
            .unwrap_or_else(|e| panic!("{}: download: {e}", self.name()))
    }
    /// The device address of element `offset` of `buf`.
    pub fn ptr<T: Elem>(&self, buf: &Buffer<T>, offset: usize) -> *mut T {
        buf.ptr_at(offset).unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn cptr<T: Elem>(&self, buf: &Buffer<T>, offset: usize) -> *const T {
        self.ptr(buf, offset).cast_const()
    }
    /// Launches and waits, failing the test with the device's message.
    pub fn run<A: KernelArgs>(&self, kernel: Kernel<A>, cfg: LaunchConfig, args: &A) {
        // SAFETY: every test builds `args` from its own live buffers, and the
        // synchronize below keeps them alive until the kernel has run.
        let launched = unsafe { self.0.launch(kernel, &cfg, args) };
        if let Err(e) = launched.and_then(|()| self.0.synchronize()) {
            panic!("{}: {kernel:?}: {e}", self.name());
        }
    }
    /// Unwraps a launcher's result with the device's name.
    pub fn ok<T>(&self, what: &str, r: Result<T, CudaError>) -> T {
        r.unwrap_or_else(|e| panic!("{}: {what}: {e}", self.name()))
    }
}

/// Declares `NAME_emu` and `NAME_gpu` tests running `body(&Dev)`.
#[macro_export]
macro_rules! on_both {
    ($emu:ident, $gpu:ident, $body:expr) => {
        #[test]
        fn $emu() {
            $body(&device::Dev::emu());
        }
        #[test]
        fn $gpu() {
            if let Some(dev) = device::Dev::gpu() {
                $body(&dev);
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Random inputs and bf16 conversions shared by the kernel test suites.

pub fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    use rand::SeedableRng;
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

pub fn uniform(r: &mut rand_chacha::ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    use rand::Rng;
    (0..n).map(|_| r.gen_range(-scale..scale)).collect()
}

pub fn to_bf16(x: &[f32]) -> Vec<half::bf16> {
    x.iter().map(|&v| half::bf16::from_f32(v)).collect()
}

pub fn to_f32(x: &[half::bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}
