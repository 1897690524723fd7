//! medssl: semi-supervised medical image classification (DSRPGC) on a small tensor/autograd
//! engine. The CPU backend is the reference; the CUDA backend (feature `cuda`) is checked
//! against it op by op, and both against PyTorch golden cases (`golden`).

pub mod autograd;
pub mod backend;
pub mod data;
pub mod error;
pub mod golden;
pub mod nn;
pub mod optim;
pub mod report;
pub mod rng;
pub mod ssl;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{Device, Tensor};
