//! convpress: train convolutional neural networks and compress them.
//!
//! - [`data`]: IDX and CIFAR-10 readers, MNIST download, preprocessing and batching;
//! - [`models`]: architecture descriptions, the model zoo and the Burn network built from them;
//! - [`train`]: the training loop with hooks, optimizers, schedules and checkpoints;
//! - [`checkpoint`]: safetensors files that carry their architecture;
//! - [`compress`]: compression methods (magnitude and structured pruning, sensitivity analysis,
//!   weight sharing, Huffman coding and the compressed file);
//! - [`rescale`]: kernel rescaling, training at low resolution first;
//! - [`device`]: the Burn backend that runs the tensors;
//! - [`kernels`]: convpress's own CPU conv, batch-norm and pooling kernels (forward and
//!   backward), plugged into Burn as a backend extension;
//! - [`runtime`]: compressed inference: sparse CSR linear and im2col conv kernels, whole pruned
//!   models;
//! - [`pipeline`]: the stage interface, the model and constraints that flow between stages,
//!   TOML recipes, the runner and its reports;
//! - [`inspect`]: what a model file holds (`convpress info`);
//! - [`plot`]: SVG charts for reports (plotters);
//! - [`bench`]: throughput measurements;
//! - [`atomic_file`]: all-or-nothing file writes;
//! - [`cli`]: the `convpress` command.

pub mod atomic_file;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod compress;
pub mod data;
pub mod device;
pub mod inspect;
pub mod kernels;
pub mod models;
pub mod pipeline;
pub mod plot;
pub mod rescale;
pub mod resources;
pub mod run_folder;
pub mod runtime;
pub mod train;
