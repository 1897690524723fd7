//! `Tensor`: a shape, a dtype and device-tagged storage. NCHW layout, row-major, contiguous.
//!
//! Tensors are immutable values shared by reference count (`Arc`), so the autograd tape can keep
//! the activations it needs for the backward pass without copying. In-place updates (optimisers,
//! EMA, running statistics) go through `&mut Tensor` and require the storage to be uniquely owned.

use std::sync::Arc;

use crate::backend::{self, Backend};
use crate::error::{Error, Result};

/// Element type. Only `F32` is computed today; the enum exists so f16/bf16 storage can be added
/// without changing every signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// CUDA device ordinal.
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => {
                if let Some(n) = s.strip_prefix("cuda:") {
                    n.parse::<usize>().map(Device::Cuda).map_err(|_| {
                        Error::msg(format!("--device '{s}': expected cpu, cuda or cuda:N"))
                    })
                } else {
                    Err(Error::msg(format!(
                        "--device '{s}': expected cpu, cuda or cuda:N"
                    )))
                }
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Backing memory of a tensor.
pub enum Storage {
    Cpu(Vec<f32>),
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::CudaStorage),
}

/// An n-dimensional f32 array on one device.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.device())
    }
}

/// Reads several tensors of one device to the host together: on a GPU they are packed on the
/// device and copied in one transfer, so the host waits for the device once.
pub fn read_many(ts: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
    match ts.first() {
        None => Ok(Vec::new()),
        Some(t) => t.backend()?.to_host_many(ts),
    }
}

/// [`read_many`] without waiting for the device (see [`crate::backend::Backend::to_host_many_later`]).
pub fn read_many_later(ts: &[&Tensor]) -> Result<crate::backend::HostRead> {
    match ts.first() {
        None => Ok(crate::backend::HostRead::Ready(Vec::new())),
        Some(t) => t.backend()?.to_host_many_later(ts),
    }
}

/// Number of elements of a shape.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Wraps existing storage. The storage length must equal the shape's element count.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(storage),
        }
    }

    /// A CPU tensor from host data.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::msg(format!(
                "tensor data has {} elements but shape {:?} needs {}",
                data.len(),
                shape,
                numel(shape)
            )));
        }
        Ok(Tensor::from_storage(Storage::Cpu(data), shape))
    }

    /// A CPU tensor of zeros.
    pub fn zeros_cpu(shape: &[usize]) -> Tensor {
        Tensor::from_storage(Storage::Cpu(vec![0.0; numel(shape)]), shape)
    }

    /// A CPU scalar tensor of shape `[1]`.
    pub fn scalar(v: f32) -> Tensor {
        Tensor::from_storage(Storage::Cpu(vec![v]), &[1])
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dims(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        DType::F32
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Mutable storage; fails when the storage is shared (a tape still holds it).
    pub fn storage_mut(&mut self) -> Result<&mut Storage> {
        Arc::get_mut(&mut self.storage).ok_or_else(|| {
            Error::msg("in-place update of a tensor whose storage is shared (clear the tape first)")
        })
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// The backend that computes on this tensor's device.
    pub fn backend(&self) -> Result<&'static dyn Backend> {
        backend::get(self.device())
    }

    /// Host slice of a CPU tensor.
    pub fn cpu_data(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v),
            #[cfg(feature = "cuda")]
            _ => Err(Error::msg(
                "cpu_data() on a device tensor: call to_vec() instead",
            )),
        }
    }

    /// Mutable host slice of a uniquely owned CPU tensor.
    pub fn cpu_data_mut(&mut self) -> Result<&mut [f32]> {
        match self.storage_mut()? {
            Storage::Cpu(v) => Ok(v),
            #[cfg(feature = "cuda")]
            _ => Err(Error::msg("cpu_data_mut() on a device tensor")),
        }
    }

    /// Copies the contents to the host.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => self.backend()?.to_host(self),
        }
    }

    /// Copies the tensor to `device` (a cheap clone when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = self.to_vec()?;
        backend::get(device)?.from_host(&host, &self.shape)
    }

    /// Same storage, new shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::msg(format!(
                "cannot reshape {:?} to {:?}",
                self.shape, shape
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// The first element, copied to the host (a device sync on CUDA).
    pub fn item(&self) -> Result<f32> {
        match &*self.storage {
            Storage::Cpu(v) => v
                .first()
                .copied()
                .ok_or_else(|| Error::msg("item() of an empty tensor")),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Ok(self.to_vec()?[0]),
        }
    }
}

/// A host copy of a tensor: `(data, shape)`.
pub type HostTensor = (Vec<f32>, Vec<usize>);
/// Host tensors by name (files, checkpoints).
pub type TensorMap = std::collections::HashMap<String, HostTensor>;
/// Named host tensors in a fixed order: `(name, data, shape)`.
pub type NamedTensors = Vec<(String, Vec<f32>, Vec<usize>)>;
