//! Compute backends. The CPU backend (reference) and the CUDA backend share
//! op-family names with `kernels/`.

pub mod cpu;
pub mod cuda;
