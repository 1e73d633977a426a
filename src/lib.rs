//! trm: training and inference engine for the Tiny Recursive Model on ARC-AGI.
//!
//! Data flows one way: config -> data -> model -> loss -> backward -> optimiser
//! -> checkpoint. This crate currently holds the data pipeline (ARC JSON,
//! augmentation, the dataset builder and loader), the CUDA kernel embedding,
//! full-state checkpoints, training telemetry and the ARC evaluator.

pub mod backend;
pub mod bundle;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset_ref;
pub mod demo;
pub mod dist;
pub mod doctor;
pub mod errors;
pub mod eval;
pub mod infer;
pub mod limits;
pub mod loss;
pub mod model;
pub mod optim;
pub mod out_guard;
pub mod package;
pub mod paths;
pub mod run_folder;
pub mod run_guard;
pub mod signals;
pub mod stepdump;
pub mod telemetry;
pub mod tensor;
pub mod train;
