//! Compute backends. The CPU backend (reference) and the CUDA backend share
//! op-family names with `kernels/`.

pub mod cuda;
