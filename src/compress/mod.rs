//! Compression methods. Each method computes *what* to do (a mask, a codebook, a rank); when
//! it happens during training is decided by a schedule driving a [`crate::train::TrainHook`]
//! (the split of Intel Distiller's pruners and policies).

pub mod binarize;
pub mod bit_sensitivity;
pub mod circulant;
pub mod compact;
pub mod distill;
pub mod few_multiplications;
pub mod fold;
pub mod format;
pub mod huffman;
pub mod lowrank;
pub mod lsq;
pub mod prune;
pub mod ptq;
pub mod qat;
pub mod quantize;
pub mod sensitivity;
pub mod share;
pub mod structured;
pub mod xnor;
