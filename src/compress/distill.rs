//! Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural
//! network", §2): a student learns from a teacher's soft targets as well as from the labels.
//!
//! With `p = softmax(z / T)` at temperature `T`, the soft loss is the Kullback-Leibler
//! divergence `KL(p_teacher ‖ p_student)` (the cross-entropy to the soft targets less the
//! teacher's entropy, a constant: same gradient, and 0 when the student matches), averaged over
//! the batch. Its gradient with respect to a student logit is `(p_s − p_t) / T` (eq. 2), so it
//! shrinks as `1/T²` for large `T` (eq. 3 and 4); the loss is multiplied by `T²` to keep the
//! soft and hard terms in proportion whatever the temperature. The training loss is
//! `(1 − α) · CE(labels) + α · T² · KL`.
//!
//! FitNets (Romero et al. 2015, "FitNets: hints for thin deep nets", §2.2): before that,
//! [`Hint`] trains the student's layers up to a *guided* layer so that a learned regressor
//! `r` maps its output onto the teacher's *hint* layer, minimising `½ ‖u_h − r(v_g)‖²`
//! (eq. 3, here averaged over the values), for the first `hint epochs`; KD follows. The
//! regressor is a 1x1 convolution (a matrix over channels, or over features for flat
//! layers), so both layers must have the same spatial size.
//!
//! [`Distill`] is the training hook: the teacher runs forward on each batch (in evaluation
//! mode, no gradients) and its soft targets enter through `extra_loss`; the label term is
//! weighted through `label_weight`. The student may be any convpress model, compressed ones
//! included: the hook adds to whatever else the stage's hooks enforce (masks, codebooks,
//! fake quantization).

use crate::checkpoint::ModelMeta;
use crate::data::Batch;
use crate::models::{Arch, Network};
use crate::train::{Progress, TrainHook};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};

/// Temperature and mix of a distillation run, checked by [`Settings::check`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Softmax temperature `T` (Hinton et al. used 2 to 20; 4 is common on MNIST).
    pub temperature: f64,
    /// Weight `α` of the soft loss; `1 − α` goes to the labels.
    pub alpha: f64,
}

impl Settings {
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!(
                "temperature must be a positive number, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(format!("alpha must be in [0, 1], got {}", self.alpha));
        }
        Ok(())
    }
}

/// `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, averaged over the rows: the soft loss
/// of Hinton et al. with its `T²` factor. `teacher` is a constant (detached).
pub fn soft_loss(student: Tensor<2>, teacher: Tensor<2>, temperature: f64) -> Tensor<1> {
    let [n, _] = student.dims();
    let t = temperature;
    let teacher = teacher.detach();
    let log_p_s = log_softmax(student.div_scalar(t), 1);
    let log_p_t = log_softmax(teacher.clone().div_scalar(t), 1);
    let p_t = softmax(teacher.div_scalar(t), 1);
    (p_t * (log_p_t - log_p_s))
        .sum()
        .mul_scalar(t * t / n.max(1) as f64)
}

/// Refuses a teacher that cannot teach this student: other classes, another input shape, or
/// other padding or resizing (the teacher must see the images the student sees). Their
/// normalisations may differ (statistics measured on other training subsets): [`Distill`]
/// maps the student's inputs to the teacher's.
pub fn check_pair(
    teacher: (&Arch, &ModelMeta),
    student: (&Arch, &ModelMeta),
) -> Result<(), String> {
    check_shapes(teacher.0, student.0)?;
    let ((_, tm), (_, sm)) = (teacher, student);
    if tm.dataset != sm.dataset {
        return Err(format!(
            "the teacher was trained on {}, the student trains on {}",
            tm.dataset.name(),
            sm.dataset.name()
        ));
    }
    let (tp, sp) = (&tm.preprocess, &sm.preprocess);
    if (tp.pad, tp.resize, tp.resize_mode) != (sp.pad, sp.resize, sp.resize_mode) {
        return Err(format!(
            "the teacher's images are padded by {} and resized to {:?}, the student's by {} and to {:?}: both must see the same images",
            tp.pad, tp.resize, sp.pad, sp.resize
        ));
    }
    Ok(())
}

/// The part of [`check_pair`] that architectures alone decide: classes and input shape.
pub fn check_shapes(teacher: &Arch, student: &Arch) -> Result<(), String> {
    if teacher.classes != student.classes {
        return Err(format!(
            "the teacher scores {} classes, the student {}",
            teacher.classes, student.classes
        ));
    }
    if teacher.input != student.input {
        return Err(format!(
            "the teacher takes {:?} images, the student {:?}: both must see the same input",
            teacher.input, student.input
        ));
    }
    Ok(())
}

/// FitNets' hint: the student's top-level layer `student` guided to the teacher's `teacher`
/// for the first `epochs` epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HintSpec {
    pub student: usize,
    pub teacher: usize,
    pub epochs: usize,
}

impl HintSpec {
    /// The two layers' output shapes, or why the regressor cannot join them.
    pub fn check(&self, teacher: &Arch, student: &Arch) -> Result<(usize, usize), String> {
        let shape = |a: &Arch, i: usize, who: &str| -> Result<crate::models::Shape, String> {
            let path = format!("layers.{i}");
            a.layer_stats()
                .into_iter()
                .find(|s| s.path == path)
                .map(|s| s.output)
                .ok_or_else(|| format!("the {who} has no layer {path}"))
        };
        use crate::models::Shape;
        let (s, t) = (
            shape(student, self.student, "student")?,
            shape(teacher, self.teacher, "teacher")?,
        );
        match (s, t) {
            (Shape::Map([cs, hs, ws]), Shape::Map([ct, ht, wt])) if [hs, ws] == [ht, wt] => {
                Ok((cs, ct))
            }
            (Shape::Flat(fs), Shape::Flat(ft)) => Ok((fs, ft)),
            _ => Err(format!(
                "the student's guided layer layers.{} gives {s}, the teacher's hint layer layers.{} gives {t}: a 1x1 regressor needs the same spatial size",
                self.student, self.teacher
            )),
        }
    }
}

/// The regressor of a hint: `[student channels, teacher channels]`.
#[derive(burn::module::Module, Debug)]
struct Regressor {
    weight: burn::module::Param<Tensor<2>>,
}

/// FitNets' hint training (see the module's documentation): the regressor and its optimizer.
pub struct Hint {
    spec: HintSpec,
    channels: (usize, usize),
    regressor: Option<Regressor>,
    optim: burn::optim::ModuleOptimizer,
}

impl Hint {
    pub fn new(spec: HintSpec, teacher: &Arch, student: &Arch) -> Result<Hint, String> {
        let channels = spec.check(teacher, student)?;
        Ok(Hint {
            spec,
            channels,
            regressor: None,
            optim: crate::train::OptimizerConfig::Sgd {
                lr: 0.0,
                momentum: 0.9,
                weight_decay: 0.0,
            }
            .build(),
        })
    }

    /// `½` the mean squared difference between the teacher's hint (on `teacher_images`) and
    /// the regressed guided output (on the student's `images`).
    fn loss_pair(
        &mut self,
        student: &Network,
        teacher: &Network,
        images: &Tensor<4>,
        teacher_images: &Tensor<4>,
    ) -> Tensor<1> {
        let device = images.device();
        let (cs, ct) = self.channels;
        let r = self.regressor.get_or_insert_with(|| {
            // Uniform in ±1/√cs from a fixed seed (not the device's shared generator), so a
            // run is reproducible whatever else draws from it.
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(0x4849_4e54);
            let bound = 1.0 / (cs as f32).sqrt();
            let v: Vec<f32> = (0..cs * ct)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let w = Tensor::<1>::from_floats(v.as_slice(), &device).reshape([cs, ct]);
            Regressor {
                weight: burn::module::Param::from_tensor(w.require_grad()),
            }
        });
        let rows = |a: crate::models::network::Activation, c: usize| -> Tensor<2> {
            use crate::models::network::Activation;
            match a {
                Activation::Map(t) => {
                    let [n, _, h, w] = t.dims();
                    t.permute([0, 2, 3, 1]).reshape([n * h * w, c])
                }
                Activation::Flat(t) => t,
            }
        };
        let guided = rows(student.forward_to(images.clone(), self.spec.student), cs);
        // On the plain device: a constant where it meets the student's autodiff tensors.
        let hint = rows(
            teacher.forward_to(teacher_images.clone(), self.spec.teacher),
            ct,
        );
        (guided.matmul(r.weight.val()) - hint)
            .powf_scalar(2.0)
            .mean()
            .mul_scalar(0.5)
    }
}

/// The distillation hook: adds `α · T² · KL` against `teacher` and weights the labels by
/// `1 − α`; with a [`Hint`], the first epochs train the guided layers on the hint alone.
pub struct Distill {
    /// In evaluation mode on the plain device.
    teacher: Network,
    settings: Settings,
    /// Per-channel `x·scale + shift` (`[1, C, 1, 1]`, on the teacher's device) from the
    /// student's normalisation to the teacher's, if they differ: `(x σ_s + μ_s − μ_t) / σ_t`.
    renormalize: Option<(Tensor<4>, Tensor<4>)>,
    /// The teacher's logits per training image, filled as images are first seen: an image
    /// that no augmentation changed gets the same logits every epoch, so the teacher runs
    /// once per image instead of once per epoch.
    cache: LogitCache,
    hint: Option<Hint>,
}

/// Rows of `classes` logits by training-image index.
#[derive(Default)]
struct LogitCache {
    classes: usize,
    rows: Vec<f32>,
    filled: Vec<bool>,
}

impl LogitCache {
    fn get(&self, indices: &[usize]) -> Option<Vec<f32>> {
        let mut out = Vec::with_capacity(indices.len() * self.classes);
        for &i in indices {
            if !*self.filled.get(i)? {
                return None;
            }
            out.extend_from_slice(&self.rows[i * self.classes..(i + 1) * self.classes]);
        }
        Some(out)
    }

    fn put(&mut self, indices: &[usize], logits: &[f32], classes: usize) {
        self.classes = classes;
        let need = indices.iter().max().map_or(0, |m| m + 1);
        if self.filled.len() < need {
            self.filled.resize(need, false);
            self.rows.resize(need * classes, 0.0);
        }
        for (k, &i) in indices.iter().enumerate() {
            self.rows[i * classes..(i + 1) * classes]
                .copy_from_slice(&logits[k * classes..(k + 1) * classes]);
            self.filled[i] = true;
        }
    }
}

impl Distill {
    /// `teacher` with the preprocessing it was trained with, teaching a student whose images
    /// are preprocessed by `student` (same padding and size: [`check_pair`]).
    pub fn new(
        teacher: Network,
        teacher_pre: &crate::data::Preprocess,
        student_pre: &crate::data::Preprocess,
        settings: Settings,
    ) -> Result<Self, String> {
        settings.check()?;
        let (t, s) = (teacher_pre, student_pre);
        let device = teacher
            .devices()
            .first()
            .cloned()
            .unwrap_or_else(Device::flex);
        let per_channel = |v: Vec<f32>| {
            let c = v.len();
            Tensor::<1>::from_floats(v.as_slice(), &device).reshape([1, c, 1, 1])
        };
        let renormalize = (t.mean != s.mean || t.std != s.std).then(|| {
            let scale = s.std.iter().zip(&t.std).map(|(ss, ts)| ss / ts).collect();
            let shift =
                (s.mean.iter().zip(&t.mean).zip(&t.std)).map(|((sm, tm), ts)| (sm - tm) / ts);
            (per_channel(scale), per_channel(shift.collect()))
        });
        Ok(Distill {
            teacher: teacher.valid(),
            settings,
            renormalize,
            cache: LogitCache::default(),
            hint: None,
        })
    }

    /// FitNets: train the guided layer on `hint` first.
    pub fn with_hint(mut self, hint: Hint) -> Self {
        self.hint = Some(hint);
        self
    }

    /// Whether `progress` is in the hint's epochs.
    fn hinting(&self, progress: &Progress) -> bool {
        self.hint
            .as_ref()
            .is_some_and(|h| progress.epoch < h.spec.epochs)
    }

    /// The teacher's input for the student's `images`: the student's normalisation mapped to
    /// the teacher's.
    fn teacher_input(&self, images: &Tensor<4>) -> Tensor<4> {
        let x = images.clone().inner();
        match &self.renormalize {
            Some((scale, shift)) => x * scale.clone() + shift.clone(),
            None => x,
        }
    }

    /// The teacher's logits for the student's `images` (no graph, whatever device they are
    /// on).
    pub fn teacher_logits(&self, images: &Tensor<4>) -> Tensor<2> {
        self.teacher.forward(self.teacher_input(images))
    }
}

impl TrainHook for Distill {
    fn name(&self) -> &str {
        "distill"
    }

    fn label_weight(&self, progress: &Progress) -> f64 {
        if self.hinting(progress) {
            0.0
        } else {
            1.0 - self.settings.alpha
        }
    }

    fn own_gradients(&mut self, progress: &Progress, grads: &mut burn::tensor::Gradients) {
        if !self.hinting(progress) {
            return;
        }
        if let Some(h) = &mut self.hint
            && let Some(r) = h.regressor.take()
        {
            let g = burn::optim::GradientsParams::from_module(grads, &r);
            let stepped = h.optim.step(progress.lr, r, g);
            h.regressor = Some(stepped);
        }
    }

    fn extra_loss(
        &mut self,
        progress: &Progress,
        model: &Network,
        batch: &Batch,
        logits: &Tensor<2>,
    ) -> Option<Tensor<1>> {
        if self.hinting(progress) {
            let input = self.teacher_input(&batch.images);
            let hint = self.hint.as_mut().expect("hinting");
            return Some(hint.loss_pair(model, &self.teacher, &batch.images, &input));
        }
        if self.settings.alpha == 0.0 {
            return None;
        }
        let [n, classes] = logits.dims();
        let device = logits.device();
        let cached = (!batch.augmented)
            .then(|| self.cache.get(&batch.indices))
            .flatten();
        let teacher = match cached {
            Some(rows) => Tensor::<1>::from_floats(rows.as_slice(), &device.clone().inner())
                .reshape([n, classes]),
            None => {
                let t = self.teacher_logits(&batch.images);
                if !batch.augmented {
                    let rows = t.clone().into_data().convert::<f32>().try_to_vec::<f32>();
                    self.cache
                        .put(&batch.indices, &rows.expect("f32 logits"), classes);
                }
                t
            }
        };
        // On the plain device: a constant where it meets the student's logits.
        let soft = soft_loss(logits.clone(), teacher, self.settings.temperature);
        Some(soft.mul_scalar(self.settings.alpha))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(v: &[f32], rows: usize, device: &Device) -> Tensor<2> {
        Tensor::<1>::from_floats(v, device).reshape([rows, v.len() / rows])
    }

    /// The soft loss against one worked by hand: two rows of three logits at T = 2.
    #[test]
    fn soft_loss_matches_a_hand_computed_value() {
        let device = Device::flex();
        let s = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let t = [2.0f32, 1.0, 0.0, 0.0, 0.5, 1.5];
        let temp = 2.0f64;
        let soft = |z: &[f32]| {
            let e: Vec<f64> = z.iter().map(|&v| (v as f64 / temp).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
        };
        let mut want = 0.0;
        for r in 0..2 {
            let (ps, pt) = (soft(&s[r * 3..r * 3 + 3]), soft(&t[r * 3..r * 3 + 3]));
            want += (0..3).map(|c| pt[c] * (pt[c] / ps[c]).ln()).sum::<f64>();
        }
        want *= temp * temp / 2.0;
        let got: f32 =
            soft_loss(logits(&s, 2, &device), logits(&t, 2, &device), temp).into_scalar();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        // A student that matches its teacher has nothing to learn.
        let same: f32 =
            soft_loss(logits(&t, 2, &device), logits(&t, 2, &device), temp).into_scalar();
        assert!(same.abs() < 1e-6);
    }

    /// The gradient is `T (p_s − p_t) / N` (eq. 2 times T²): without the T² factor it shrinks
    /// as 1/T² at high temperature (eq. 3), and with it the soft loss pulls as hard at T = 20 as
    /// at T = 10.
    #[test]
    fn gradient_scales_with_t_squared() {
        let ad = Device::flex().autodiff();
        let s = [0.3f32, -0.2, 0.1, 0.4, 0.0, -0.5];
        let t = [0.1f32, 0.2, -0.3, -0.1, 0.3, 0.2];
        let grad = |temp: f64| -> Vec<f32> {
            let x = logits(&s, 2, &ad).require_grad();
            let loss = soft_loss(x.clone(), logits(&t, 2, &ad), temp);
            let g = loss.backward();
            x.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap()
        };
        for temp in [1.0f64, 4.0] {
            let g = grad(temp);
            let p = |z: &[f32]| {
                let e: Vec<f64> = z.iter().map(|&v| (v as f64 / temp).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
            };
            for r in 0..2 {
                let (ps, pt) = (p(&s[r * 3..r * 3 + 3]), p(&t[r * 3..r * 3 + 3]));
                for c in 0..3 {
                    let want = temp * (ps[c] - pt[c]) / 2.0;
                    assert!((g[r * 3 + c] as f64 - want).abs() < 1e-6);
                }
            }
        }
        let (g10, g20) = (grad(10.0), grad(20.0));
        for (a, b) in g10.iter().zip(&g20) {
            // Scaled: the same pull (within 3%, the O(z/T) terms) at both temperatures;
            // unscaled (divided by T²) it would be 4x smaller at T = 20.
            assert!((a / b - 1.0).abs() < 0.03, "{a} vs {b}");
            let unscaled = (a / 100.0) / (b / 400.0);
            assert!((unscaled - 4.0).abs() < 0.12, "{unscaled}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let ok = Settings {
            temperature: 4.0,
            alpha: 0.9,
        };
        assert!(ok.check().is_ok());
        for (t, a) in [
            (0.0, 0.5),
            (-1.0, 0.5),
            (f64::NAN, 0.5),
            (4.0, 1.5),
            (4.0, -0.1),
        ] {
            assert!(
                Settings {
                    temperature: t,
                    alpha: a
                }
                .check()
                .is_err()
            );
        }
    }
}
