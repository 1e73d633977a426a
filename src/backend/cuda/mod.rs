//! CUDA backend. For now: the embedded SM90 kernels (see build.rs).
