//! Datasets, splits, augmentation and the SSL batch loader (SPEC §4).
//!
//! - [`Dataset`]: every format ends up as in-memory u8 HWC images of one common size, labels,
//!   class names and (when the source has one) an official train/val/test split. Readers:
//!   medssl raw ([`Format::Raw`]), the HAM10000 200×150 JPEG pack ([`Format::JpegPack`]), MedMNIST
//!   `.npz` ([`Format::Npz`]), the ISIC 2018 Task 3 CSV layout ([`Format::IsicCsv`]) and an image
//!   folder with one sub-folder per class ([`Format::Folder`]). Entry point: [`load`].
//! - [`split`]: the official or a stratified seeded 70/10/20 split, and the labelled subset
//!   (ratio or the SRC-MT protocol); [`Partition`] can be written to a run directory.
//! - [`augment`]: weak / strong views on u8 HWC, normalised to f32 CHW.
//! - [`loader`]: deterministic, resumable, prefetching SSL (or supervised) batch loader and a
//!   plain evaluation iterator.
//! - [`cli`]: `medssl data info|preview` and `medssl-bench data`.

pub mod augment;
pub mod cli;
pub mod dataset;
mod folder;
mod imageio;
mod isic;
pub mod loader;
mod npz;
mod raw;
mod rng;
pub mod split;

pub use augment::{channel_stats, AugmentConfig, Augmenter, Normalize, RaOp};
pub use dataset::{detect, load, Benchmark, Dataset, Format, LoadOptions, Split, IMAGE_SIZES};
pub use loader::{
    eval_batches, EvalBatch, EvalBatches, LoaderConfig, LoaderMode, Position, SslBatch, SslLoader,
};
pub use split::{
    partition, read_partition, stratified_split, write_partition, Labeled, LabeledProtocol,
    Partition, DEFAULT_LABELED_RATIO,
};
