//! ARC data: JSON puzzles, grids and augmentation, the dataset builder, .npy
//! I/O and the training/test loader.

pub mod arc;
pub mod augment;
pub mod build_folder;
pub mod builder;
pub mod grid;
pub mod grid_scan;
pub mod loader;
pub mod metadata;
pub mod npy;
pub mod pyjson;
pub mod synthetic;
