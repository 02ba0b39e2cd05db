//! convpress's kernels inside Burn: a backend extension (Burn's `#[backend_extension]`) whose
//! operations run this crate's conv, batch-norm and pooling kernels on the `Flex` CPU backend,
//! with their own backward passes under `Autodiff<Flex>`. Models keep Burn's modules and
//! parameters; only the calls that do the arithmetic change.
//!
//! The tensor-level functions ([`conv2d`], [`batch_norm_train`], ...) route a call here only on
//! a Flex device (plain or autodiff), with `f32` values, when [`Ops::Convpress`] is in effect;
//! everything else (CUDA, other dtypes, `Ops::Burn`) runs Burn's own op, so every backend keeps
//! working and the two can be compared on one machine.

use super::circulant::{self, CirculantPlan, CirculantShape};
use super::conv::{self, Conv2dProblem, Wanted};
use super::norm::{self, NormShape};
use super::pool::{self, PoolProblem};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops as AdOps, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, DispatchDevice, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use std::borrow::Cow;
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Which implementation runs convolutions, batch norm and pooling on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ops {
    /// convpress's kernels (the default).
    #[default]
    Convpress,
    /// Burn's own operations.
    Burn,
}

static PROCESS_USES_BURN: AtomicBool = AtomicBool::new(false);

thread_local! {
    static THREAD_OPS: Cell<Option<Ops>> = const { Cell::new(None) };
}

/// Sets the process-wide choice (the CLI's `--ops`).
pub fn set_default_ops(ops: Ops) {
    PROCESS_USES_BURN.store(ops == Ops::Burn, Ordering::Relaxed);
}

/// The choice in effect on this thread.
pub fn current_ops() -> Ops {
    THREAD_OPS.with(Cell::get).unwrap_or({
        if PROCESS_USES_BURN.load(Ordering::Relaxed) {
            Ops::Burn
        } else {
            Ops::Convpress
        }
    })
}

/// Runs `f` with `ops` in effect on this thread (tests compare both in one process this way;
/// Burn runs a model's forward and backward on the calling thread).
pub fn with_ops<R>(ops: Ops, f: impl FnOnce() -> R) -> R {
    let before = THREAD_OPS.with(|c| c.replace(Some(ops)));
    struct Restore(Option<Ops>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_OPS.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Whether a call on `tensor` goes to convpress's kernels.
pub fn routed<const D: usize>(tensor: &Tensor<D>) -> bool {
    current_ops() == Ops::Convpress
        && tensor.dtype() == DType::F32
        && matches!(
            tensor.device().inner().as_dispatch(),
            DispatchDevice::Flex(_)
        )
}

/// The operations convpress implements for Burn. Only forward passes appear here: the
/// `Autodiff<Flex>` implementation records each call with its own backward.
#[backend_extension(Flex, Autodiff)]
pub trait CnnOps: Backend {
    fn cp_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    fn cp_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// `max(0, conv2d(x) + bias)` in one pass, for inference.
    fn cp_conv2d_bias_relu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self>;

    /// `(y, batch mean, biased batch variance)`.
    fn cp_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    fn cp_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self>;

    fn cp_max_pool2d(x: FloatTensor<Self>, pool: PoolParams) -> FloatTensor<Self>;

    fn cp_avg_pool2d(
        x: FloatTensor<Self>,
        pool: PoolParams,
        count_include_pad: bool,
    ) -> FloatTensor<Self>;

    /// A circulant projection ([`circulant`]): `x` `[N, in]`, `r` `[d]`, `bias` `[out]`.
    fn cp_circulant(
        x: FloatTensor<Self>,
        r: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        signs: Signs,
    ) -> FloatTensor<Self>;
}

/// The fixed input signs of a circulant layer, one per input feature (shared, not copied, by
/// every call).
#[derive(Debug, Clone, PartialEq)]
pub struct Signs(pub Arc<Vec<f32>>);

/// A pooling window: what [`PoolProblem`] needs besides the input's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolParams {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

// ------------------------------------------------------------------ Flex: values in, values out

fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    assert_eq!(t.dtype(), DType::F32, "convpress kernels take f32 tensors");
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.shape().to_vec()
}

fn conv_problem(x: &FlexTensor, w: &FlexTensor, options: &ConvOptions<2>) -> Conv2dProblem {
    let (xd, wd) = (dims(x), dims(w));
    assert_eq!(xd.len(), 4, "conv2d input must be [N, C, H, W]");
    let p = Conv2dProblem {
        batch: xd[0],
        in_channels: xd[1],
        out_channels: wd[0],
        in_hw: [xd[2], xd[3]],
        kernel: [wd[2], wd[3]],
        stride: options.stride,
        pad_begin: [options.padding[0].0, options.padding[1].0],
        pad_end: [options.padding[0].1, options.padding[1].1],
        dilation: options.dilation,
        groups: options.groups,
    };
    assert_eq!(
        wd[1] * p.groups,
        p.in_channels,
        "conv2d: weight expects {} input channels per group",
        wd[1]
    );
    p
}

/// `[N, C, rest...]` as batch-norm planes.
fn norm_shape(x: &FlexTensor) -> NormShape {
    let d = dims(x);
    assert!(d.len() >= 2, "batch norm input must be [N, C, ...]");
    NormShape {
        batch: d[0],
        channels: d[1],
        plane: d[2..].iter().product(),
    }
}

fn pool_problem(x: &FlexTensor, p: PoolParams) -> PoolProblem {
    let d = dims(x);
    assert_eq!(d.len(), 4, "pool2d input must be [N, C, H, W]");
    PoolProblem {
        planes: d[0] * d[1],
        in_hw: [d[2], d[3]],
        kernel: p.kernel,
        stride: p.stride,
        padding: p.padding,
        dilation: p.dilation,
    }
}

fn conv_forward(
    x: &FlexTensor,
    w: &FlexTensor,
    b: Option<&FlexTensor>,
    o: &ConvOptions<2>,
) -> FlexTensor {
    conv_forward_act(x, w, b, o, false)
}

fn conv_forward_act(
    x: &FlexTensor,
    w: &FlexTensor,
    b: Option<&FlexTensor>,
    o: &ConvOptions<2>,
    relu: bool,
) -> FlexTensor {
    let p = conv_problem(x, w, o);
    let bias = b.map(values);
    let (xv, wv) = (values(x), values(w));
    let y = conv::forward_new(&p, &xv, &wv, bias.as_deref(), relu);
    let [oh, ow] = p.out_hw();
    tensor(y, vec![p.batch, p.out_channels, oh, ow])
}

fn max_pool_forward(x: &FlexTensor, params: PoolParams) -> (FlexTensor, Vec<i64>, PoolProblem) {
    let p = pool_problem(x, params);
    let (y, idx) = pool::max_forward(&p, &values(x));
    let [oh, ow] = p.out_hw();
    let d = dims(x);
    (tensor(y, vec![d[0], d[1], oh, ow]), idx, p)
}

fn avg_pool_forward(
    x: &FlexTensor,
    params: PoolParams,
    include_pad: bool,
) -> (FlexTensor, PoolProblem) {
    let p = pool_problem(x, params);
    let y = pool::avg_forward(&p, &values(x), include_pad);
    let [oh, ow] = p.out_hw();
    let d = dims(x);
    (tensor(y, vec![d[0], d[1], oh, ow]), p)
}

fn circulant_shape(x: &FlexTensor, r: &FlexTensor, bias: &FlexTensor) -> CirculantShape {
    let (xd, rd, bd) = (dims(x), dims(r), dims(bias));
    assert!(
        xd.len() == 2 && rd.len() == 1 && bd.len() == 1,
        "circulant: x [N, in], r [d], bias [out]"
    );
    let s = CirculantShape {
        batch: xd[0],
        in_features: xd[1],
        out_features: bd[0],
    };
    assert_eq!(rd[0], s.d(), "circulant: r must have max(in, out) values");
    s
}

fn circulant_forward(
    x: &FlexTensor,
    r: &FlexTensor,
    bias: &FlexTensor,
    signs: &Signs,
) -> FlexTensor {
    let s = circulant_shape(x, r, bias);
    let plan = CirculantPlan::new(s.d());
    let y = plan.forward(&s, &values(x), &values(r), &signs.0, Some(&values(bias)));
    tensor(y, vec![s.batch, s.out_features])
}

impl CnnOps for Flex {
    fn cp_conv2d(x: FlexTensor, weight: FlexTensor, options: ConvOptions<2>) -> FlexTensor {
        conv_forward(&x, &weight, None, &options)
    }

    fn cp_conv2d_bias(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        conv_forward(&x, &weight, Some(&bias), &options)
    }

    fn cp_conv2d_bias_relu(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        conv_forward_act(&x, &weight, Some(&bias), &options, true)
    }

    fn cp_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let s = norm_shape(&x);
        let (y, mean, var) =
            norm::train_forward(s, &values(&x), &values(&gamma), &values(&beta), epsilon);
        (
            tensor(y, dims(&x)),
            tensor(mean, vec![s.channels]),
            tensor(var, vec![s.channels]),
        )
    }

    fn cp_batch_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
    ) -> FlexTensor {
        let s = norm_shape(&x);
        let y = norm::eval_forward(
            s,
            &values(&x),
            &values(&gamma),
            &values(&beta),
            &values(&mean),
            &values(&variance),
            epsilon,
        );
        tensor(y, dims(&x))
    }

    fn cp_max_pool2d(x: FlexTensor, pool: PoolParams) -> FlexTensor {
        max_pool_forward(&x, pool).0
    }

    fn cp_avg_pool2d(x: FlexTensor, pool: PoolParams, count_include_pad: bool) -> FlexTensor {
        avg_pool_forward(&x, pool, count_include_pad).0
    }

    fn cp_circulant(x: FlexTensor, r: FlexTensor, bias: FlexTensor, signs: Signs) -> FlexTensor {
        circulant_forward(&x, &r, &bias, &signs)
    }
}

// ------------------------------------------------------------------ Autodiff<Flex>: backward

/// Gradients of a convolution, registered for the parents that track one.
fn conv_grads(
    state: (FlexTensor, FlexTensor, ConvOptions<2>),
    grad: FlexTensor,
    wanted: Wanted,
) -> (Option<FlexTensor>, Option<FlexTensor>, Option<FlexTensor>) {
    let (x, w, options) = state;
    let p = conv_problem(&x, &w, &options);
    let g = conv::backward(&p, &values(&x), &values(&w), &values(&grad), wanted);
    (
        g.x.map(|v| tensor(v, dims(&x))),
        g.weight.map(|v| tensor(v, dims(&w))),
        g.bias.map(|v| tensor(v, vec![p.out_channels])),
    )
}

#[derive(Debug)]
struct ConvWithBias;

impl Backward<Flex, 3> for ConvWithBias {
    type State = (FlexTensor, FlexTensor, ConvOptions<2>);

    fn backward(self, ops: AdOps<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw, nb] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let wanted = Wanted {
            x: nx.is_some(),
            weight: nw.is_some(),
            bias: nb.is_some(),
        };
        let (dx, dw, db) = conv_grads(ops.state, grad, wanted);
        for (node, g) in [(nx, dx), (nw, dw), (nb, db)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct ConvNoBias;

impl Backward<Flex, 2> for ConvNoBias {
    type State = (FlexTensor, FlexTensor, ConvOptions<2>);

    fn backward(self, ops: AdOps<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nw] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let wanted = Wanted {
            x: nx.is_some(),
            weight: nw.is_some(),
            bias: false,
        };
        let (dx, dw, _) = conv_grads(ops.state, grad, wanted);
        for (node, g) in [(nx, dx), (nw, dw)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct BatchNormBackward;

impl Backward<Flex, 3> for BatchNormBackward {
    /// Input, gamma, batch mean, batch variance, epsilon.
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f64);

    fn backward(self, ops: AdOps<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, ngamma, nbeta] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, gamma, mean, var, eps) = ops.state;
        let s = norm_shape(&x);
        let (dx, dgamma, dbeta) = norm::train_backward(
            s,
            &values(&x),
            &values(&gamma),
            &values(&mean),
            &values(&var),
            eps,
            &values(&grad),
        );
        if let Some(node) = nx {
            grads.register::<Flex>(node.id, tensor(dx, dims(&x)));
        }
        if let Some(node) = ngamma {
            grads.register::<Flex>(node.id, tensor(dgamma, vec![s.channels]));
        }
        if let Some(node) = nbeta {
            grads.register::<Flex>(node.id, tensor(dbeta, vec![s.channels]));
        }
    }
}

#[derive(Debug)]
struct MaxPoolBackward;

impl Backward<Flex, 1> for MaxPoolBackward {
    type State = (PoolProblem, Arc<Vec<i64>>, Vec<usize>);

    fn backward(self, ops: AdOps<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (p, idx, x_dims) = ops.state;
        if let Some(node) = nx {
            let dx = pool::max_backward(&p, &values(&grad), &idx);
            grads.register::<Flex>(node.id, tensor(dx, x_dims));
        }
    }
}

#[derive(Debug)]
struct AvgPoolBackward;

impl Backward<Flex, 1> for AvgPoolBackward {
    type State = (PoolProblem, bool, Vec<usize>);

    fn backward(self, ops: AdOps<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (p, include_pad, x_dims) = ops.state;
        if let Some(node) = nx {
            let dx = pool::avg_backward(&p, &values(&grad), include_pad);
            grads.register::<Flex>(node.id, tensor(dx, x_dims));
        }
    }
}

#[derive(Debug)]
struct CirculantBackward;

impl Backward<Flex, 3> for CirculantBackward {
    /// Input, r, the bias's length, signs.
    type State = (FlexTensor, FlexTensor, usize, Signs);

    fn backward(self, ops: AdOps<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [nx, nr, nb] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, r, out, signs) = ops.state;
        let xd = dims(&x);
        let s = CirculantShape {
            batch: xd[0],
            in_features: xd[1],
            out_features: out,
        };
        let wanted = circulant::Wanted {
            x: nx.is_some(),
            r: nr.is_some(),
            bias: nb.is_some(),
        };
        let g = CirculantPlan::new(s.d()).backward(
            &s,
            &values(&x),
            &values(&r),
            &signs.0,
            &values(&grad),
            wanted,
        );
        if let (Some(node), Some(v)) = (nx, g.x) {
            grads.register::<Flex>(node.id, tensor(v, xd));
        }
        if let (Some(node), Some(v)) = (nr, g.r) {
            grads.register::<Flex>(node.id, tensor(v, vec![s.d()]));
        }
        if let (Some(node), Some(v)) = (nb, g.bias) {
            grads.register::<Flex>(node.id, tensor(v, vec![out]));
        }
    }
}

type AdTensor<C> = FloatTensor<Autodiff<Flex, C>>;

impl<C: CheckpointStrategy> CnnOps for Autodiff<Flex, C> {
    fn cp_conv2d(x: AdTensor<C>, weight: AdTensor<C>, options: ConvOptions<2>) -> AdTensor<C> {
        let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
        let y = conv_forward(&xp, &wp, None, &options);
        match ConvNoBias
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, wp, options), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn cp_conv2d_bias(
        x: AdTensor<C>,
        weight: AdTensor<C>,
        bias: AdTensor<C>,
        options: ConvOptions<2>,
    ) -> AdTensor<C> {
        let (xp, wp) = (x.primitive().clone(), weight.primitive().clone());
        let y = conv_forward(&xp, &wp, Some(bias.primitive()), &options);
        match ConvWithBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, wp, options), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn cp_conv2d_bias_relu(
        x: AdTensor<C>,
        weight: AdTensor<C>,
        bias: AdTensor<C>,
        options: ConvOptions<2>,
    ) -> AdTensor<C> {
        // Differentiable as two recorded operations.
        use burn::backend::ops::ActivationOps;
        let y = Self::cp_conv2d_bias(x, weight, bias, options);
        <Self as ActivationOps<Self>>::relu(y)
    }

    fn cp_batch_norm_train(
        x: AdTensor<C>,
        gamma: AdTensor<C>,
        beta: AdTensor<C>,
        epsilon: f64,
    ) -> (AdTensor<C>, AdTensor<C>, AdTensor<C>) {
        let (xp, gp, bp) = (
            x.primitive().clone(),
            gamma.primitive().clone(),
            beta.primitive().clone(),
        );
        let (y, mean, var) = Flex::cp_batch_norm_train(xp.clone(), gp.clone(), bp, epsilon);
        let y = match BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, gp, mean.clone(), var.clone(), epsilon), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, AdTensor::<C>::new(mean), AdTensor::<C>::new(var))
    }

    fn cp_batch_norm(
        x: AdTensor<C>,
        gamma: AdTensor<C>,
        beta: AdTensor<C>,
        mean: AdTensor<C>,
        variance: AdTensor<C>,
        epsilon: f64,
    ) -> AdTensor<C> {
        // Normalizing with fixed statistics on an autodiff device (a frozen layer being
        // fine-tuned through) is rare: Burn's composed op carries its gradients.
        use burn::backend::ops::ModuleOps;
        <Self as ModuleOps<Self>>::batch_norm(x, gamma, beta, mean, variance, epsilon)
    }

    fn cp_max_pool2d(x: AdTensor<C>, pool: PoolParams) -> AdTensor<C> {
        let xp = x.primitive().clone();
        let (y, idx, p) = max_pool_forward(&xp, pool);
        match MaxPoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((p, Arc::new(idx), dims(&xp)), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn cp_avg_pool2d(x: AdTensor<C>, pool: PoolParams, count_include_pad: bool) -> AdTensor<C> {
        let xp = x.primitive().clone();
        let (y, p) = avg_pool_forward(&xp, pool, count_include_pad);
        match AvgPoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((p, count_include_pad, dims(&xp)), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn cp_circulant(
        x: AdTensor<C>,
        r: AdTensor<C>,
        bias: AdTensor<C>,
        signs: Signs,
    ) -> AdTensor<C> {
        let (xp, rp) = (x.primitive().clone(), r.primitive().clone());
        let y = circulant_forward(&xp, &rp, bias.primitive(), &signs);
        let out = dims(bias.primitive())[0];
        match CirculantBackward
            .prepare::<C>([x.node(), r.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, rp, out, signs), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

// ------------------------------------------------------------------ tensor-level entry points

/// 2-D convolution with Burn's semantics.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !routed(&x) || weight.dtype() != DType::F32 {
        return burn::tensor::module::conv2d(x, weight, bias, options);
    }
    type D = burn::backend::Dispatch;
    Tensor::from_dispatch(match bias {
        Some(b) => <D as CnnOps>::cp_conv2d_bias(
            x.into_dispatch(),
            weight.into_dispatch(),
            b.into_dispatch(),
            options,
        ),
        None => <D as CnnOps>::cp_conv2d(x.into_dispatch(), weight.into_dispatch(), options),
    })
}

/// `max(0, conv2d(x, weight) + bias)`: one pass over the output on convpress's kernels.
pub fn conv2d_relu(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    if !routed(&x) || weight.dtype() != DType::F32 {
        let y = burn::tensor::module::conv2d(x, weight, Some(bias), options);
        return burn::tensor::activation::relu(y);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as CnnOps>::cp_conv2d_bias_relu(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        options,
    ))
}

/// Batch norm with the batch's statistics: `(y, mean, biased variance)`; `x` is `[N, C, ...]`.
pub fn batch_norm_train<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    if !routed(&x) {
        let r = burn::tensor::module::batch_norm_train(x, gamma, beta, epsilon);
        return (r.output, r.mean, r.variance);
    }
    let (y, mean, var) = <burn::backend::Dispatch as CnnOps>::cp_batch_norm_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    (
        Tensor::from_dispatch(y),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

/// Batch norm with given statistics (inference).
pub fn batch_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    variance: Tensor<1>,
    epsilon: f64,
) -> Tensor<D> {
    if !routed(&x) {
        return burn::tensor::module::batch_norm(x, gamma, beta, mean, variance, epsilon);
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as CnnOps>::cp_batch_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        mean.into_dispatch(),
        variance.into_dispatch(),
        epsilon,
    ))
}

/// Max pooling (symmetric padding, no ceil mode).
pub fn max_pool2d(x: Tensor<4>, pool: PoolParams) -> Tensor<4> {
    if !routed(&x) {
        return burn::tensor::module::max_pool2d(
            x,
            burn::tensor::ops::MaxPoolOptions::new(pool.kernel)
                .with_stride(pool.stride)
                .with_padding(pool.padding)
                .with_dilation(pool.dilation),
        );
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as CnnOps>::cp_max_pool2d(
        x.into_dispatch(),
        pool,
    ))
}

/// Average pooling (symmetric padding, no dilation, no ceil mode).
pub fn avg_pool2d(x: Tensor<4>, pool: PoolParams, count_include_pad: bool) -> Tensor<4> {
    assert_eq!(pool.dilation, [1, 1], "average pooling has no dilation");
    if !routed(&x) {
        return burn::tensor::module::avg_pool2d(
            x,
            burn::tensor::ops::AvgPoolOptions::new(pool.kernel)
                .with_stride(pool.stride)
                .with_padding(pool.padding)
                .with_count_include_pad(count_include_pad),
        );
    }
    Tensor::from_dispatch(<burn::backend::Dispatch as CnnOps>::cp_avg_pool2d(
        x.into_dispatch(),
        pool,
        count_include_pad,
    ))
}

/// A circulant projection `(circ(r) · (signs ∘ x̃))[..out] + bias` with Cheng et al.'s
/// semantics ([`circulant`]): `x` `[N, in]`, `r` `[max(in, out)]`, `bias` `[out]`. On Flex it
/// runs through the FFT with its own backward; elsewhere (CUDA, `--ops burn`) as a product with
/// the explicit `d x d` matrix, built from `r` by Burn's ops so autodiff carries its gradient
/// (O(d²) memory: fine for checking, not for large layers).
pub fn circulant(x: Tensor<2>, r: Tensor<1>, bias: Tensor<1>, signs: &Signs) -> Tensor<2> {
    if routed(&x) && r.dtype() == DType::F32 {
        return Tensor::from_dispatch(<burn::backend::Dispatch as CnnOps>::cp_circulant(
            x.into_dispatch(),
            r.into_dispatch(),
            bias.into_dispatch(),
            signs.clone(),
        ));
    }
    let device = x.device();
    let [_, n_in] = x.dims();
    let [d] = r.dims();
    let [n_out] = bias.dims();
    // `m[j][i] = R[i][j] · sign[j] = r[(i − j) mod d] · sign[j]`, so `y = x · m`.
    let index: Vec<i64> = (0..n_in)
        .flat_map(|j| (0..n_out).map(move |i| ((i + d - j) % d) as i64))
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n_in * n_out]), &device);
    let signs = Tensor::<2>::from_data(TensorData::new(signs.0.to_vec(), [n_in, 1]), &device);
    let m = r.select(0, index).reshape([n_in, n_out]) * signs;
    x.matmul(m) + bias.unsqueeze_dim(0)
}
