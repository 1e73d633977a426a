//! ARC data: JSON puzzles, grids and augmentation, the dataset builder, .npy
//! I/O and the training/test loader.

pub mod npy;
pub mod loader;
pub mod metadata;
