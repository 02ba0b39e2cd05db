//! Which Burn backend runs the tensors. The model code is the same for every backend: Burn
//! 0.22 dispatches on the runtime [`Device`].

use burn::prelude::Device;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Burn's pure-Rust CPU backend (the default; always built).
    #[default]
    Flex,
    /// Burn's CUDA backend, GPU 0 (needs a build with `--features cuda`).
    Cuda,
}

impl Backend {
    /// The plain (non-autodiff) device of this backend.
    pub fn device(self) -> anyhow::Result<Device> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            Backend::Cuda => cuda(),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> anyhow::Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> anyhow::Result<Device> {
    anyhow::bail!(
        "this convpress was built without CUDA: rebuild with `cargo build --release --features cuda`"
    )
}
