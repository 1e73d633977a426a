//! `dataset.json`: the per-split metadata, field for field as the reference's
//! `PuzzleDatasetMetadata`.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMetadata {
    pub pad_id: i64,
    pub ignore_label_id: Option<i64>,
    pub blank_identifier_id: i64,
    pub vocab_size: usize,
    pub seq_len: usize,
    pub num_puzzle_identifiers: usize,
    pub total_groups: usize,
    pub mean_puzzle_examples: f64,
    pub total_puzzles: usize,
    pub sets: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid dataset.json: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl DatasetMetadata {
    pub fn load(path: &Path) -> Result<DatasetMetadata, MetadataError> {
        let text = std::fs::read_to_string(path).map_err(|source| MetadataError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| MetadataError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), MetadataError> {
        let text = super::pyjson::to_string(self);
        std::fs::write(path, text).map_err(|source| MetadataError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}
