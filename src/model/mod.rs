//! The TRM network: config, named weights, safetensors I/O, the flat
//! parameter layout, the ACT rules every engine shares (`act`), the engine
//! seam (`engine`), the CPU engine (`trm` with `cpu`), the CUDA engine
//! (`gpu`) and the choice between them (`device_choice`).

pub mod act;
pub mod config;
pub mod cpu;
pub mod device_choice;
pub mod engine;
pub mod gpu;
pub mod layout;
pub mod pool;
pub mod safetensors_io;
pub mod trm;
pub mod weights;
