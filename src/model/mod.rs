//! The TRM network: config, named weights, safetensors I/O, the flat
//! parameter layout, the ACT rules every engine shares (`act`), the engine
//! seam (`engine`), the CPU engine (`trm` with `cpu`), the CUDA engine
//! (`gpu`), the choice between them (`device_choice`) and the work of one
//! step (`flops`).

pub mod act;
pub mod config;
pub mod cpu;
pub mod device_choice;
pub mod engine;
pub mod flops;
pub mod gpu;
pub mod layout;
pub mod pool;
pub mod safetensors_io;
pub mod trm;
pub mod weights;
