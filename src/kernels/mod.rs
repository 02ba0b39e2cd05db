//! convpress's own CPU kernels for the operations that dominate CNN training and inference:
//! 2-D convolution ([`conv`]), batch normalization ([`norm`]) and max/average pooling
//! ([`pool`]), forward and backward, on plain `f32` buffers in `[N, C, H, W]` order.
//!
//! Each module keeps a plain `reference` implementation beside the fast one; the tests hold
//! the fast path to the reference, to Burn's own op, and the reference to finite differences.
//! [`extension`] plugs the kernels into Burn (custom ops on the `Flex` backend with their own
//! backward under `Autodiff`), and [`gemm`] is the single matrix-product entry point.

pub mod binary;
pub mod circulant;
pub mod conv;
pub mod extension;
pub mod gemm;
pub mod int8;
pub mod memory;
pub mod norm;
pub mod pool;

pub use extension::{Ops, PoolParams, current_ops, set_default_ops, with_ops};
