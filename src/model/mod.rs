//! The TRM network: config, named weights, safetensors I/O and the model step.

pub mod act;
pub mod config;
pub mod cpu;
pub mod engine;
pub mod layout;
pub mod pool;
pub mod safetensors_io;
pub mod trm;
pub mod weights;
