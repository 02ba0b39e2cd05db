//! The one list of stages a recipe can name. Adding a method adds one line here.

use super::Stage;
use super::stages::{
    binarize, circulant, compact, decompose, distill, encode, eval, finetune, prune, prune_filters,
    qat, quantize, share, train,
};
use super::table::{Error, StageTable};

/// A stage's recipe name, what it does, and how its table is read.
pub struct StageKind {
    pub name: &'static str,
    pub about: &'static str,
    pub parse: fn(&StageTable) -> Result<Box<dyn Stage>, Error>,
}

pub const STAGES: &[StageKind] = &[
    StageKind {
        name: "train",
        about: "train from scratch (the flags of `convpress train`)",
        parse: train::parse,
    },
    StageKind {
        name: "rescale",
        about: "train from scratch with kernel rescaling (rescale-from defaults to 0.5)",
        parse: train::parse_rescale,
    },
    StageKind {
        name: "prune",
        about: "magnitude pruning while retraining, on an AGP schedule",
        parse: prune::parse,
    },
    StageKind {
        name: "prune-filters",
        about: "remove whole filters (residual-aware): a smaller dense model",
        parse: prune_filters::parse,
    },
    StageKind {
        name: "decompose",
        about: "low-rank factorization (svd, separable, cp, tucker2): smaller dense layers",
        parse: decompose::parse,
    },
    StageKind {
        name: "circulant",
        about: "dense layers as circulant projections through the FFT (Cheng et al. 2015)",
        parse: circulant::parse,
    },
    StageKind {
        name: "distill",
        about: "knowledge distillation (Hinton et al. 2015): train with a teacher's soft targets",
        parse: distill::parse,
    },
    StageKind {
        name: "rewrite",
        about: "compact filters: separable, fire, crelu, rotations or dihedral (to = FORM)",
        parse: compact::parse,
    },
    StageKind {
        name: "share",
        about: "k-means weight sharing (pruned weights stay zero)",
        parse: share::parse,
    },
    StageKind {
        name: "finetune",
        about: "train further, keeping masks and codebooks",
        parse: finetune::parse,
    },
    StageKind {
        name: "encode",
        about: "write the compressed file: relative indices and Huffman coding",
        parse: encode::parse,
    },
    StageKind {
        name: "quantize",
        about: "post-training quantization (int8 or fewer bits), written as a .cpz",
        parse: quantize::parse,
    },
    StageKind {
        name: "qat",
        about: "quantization-aware training at 2 to 8 bits, written as a .cpz",
        parse: qat::parse,
    },
    StageKind {
        name: "binarize",
        about: "binary or ternary weights (BinaryConnect, BWN, TWN, loss-aware), written as a .cpz",
        parse: binarize::parse,
    },
    StageKind {
        name: "eval",
        about: "test accuracy of the model so far",
        parse: eval::parse,
    },
];

pub fn find(name: &str) -> Option<&'static StageKind> {
    STAGES.iter().find(|s| s.name == name)
}

/// The stage names, comma separated, for messages.
pub fn names() -> String {
    STAGES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}
