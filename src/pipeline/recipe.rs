//! Recipes: TOML files that list stages in the order they run, each with its settings and
//! per-layer overrides (in the spirit of Distiller's YAML schedules, but strict: an unknown
//! key, stage or layer is an error that names its line).
//!
//! ```toml
//! description = "Deep Compression on LeNet-5"
//!
//! [report]               # optional
//! latency-seconds = 1.0  # per latency figure
//!
//! [[stage]]
//! kind = "train"
//! model = "lenet5"
//!
//! [[stage]]
//! kind = "prune"
//! sparsity = 0.93
//! epochs = 12
//! [stage.layers]         # pattern = { settings }; the last matching pattern wins
//! "layers.0" = { sparsity = 0.0 }
//! ```
//!
//! A stage's keys are the flags of its command (`convpress prune --sparsity` is `sparsity`);
//! `convpress compress --help` lists the stages.

use super::layers::LayerRules;
use super::{Stage, registry};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

/// A mistake in a recipe, with the bytes it is about.
#[derive(Debug, Clone)]
pub struct Error {
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Error {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Error {
            span: Some(span),
            message: message.into(),
        }
    }
}

impl From<toml::de::Error> for Error {
    fn from(e: toml::de::Error) -> Self {
        Error {
            span: e.span(),
            message: e.message().trim().to_string(),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// `FILE:LINE:COL: message` and the line itself, as compilers print it.
pub fn render(path: &Path, text: &str, e: &Error) -> String {
    match &e.span {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            let source = text.lines().nth(line - 1).unwrap_or("");
            format!(
                "{}:{line}:{col}: {}\n  {line:>4} | {source}",
                path.display(),
                e.message
            )
        }
        None => format!("{}: {}", path.display(), e.message),
    }
}

/// Settings parsed from no flags at all: the defaults clap declares, so a recipe key left
/// out means what leaving out the flag means, and defaults are written in one place.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd
        .try_get_matches_from(Vec::<String>::new())
        .expect("every setting has a default");
    T::from_arg_matches(&matches).expect("defaults parse")
}

/// One `[[stage]]` table, handed to the stage's parser.
pub struct StageTable<'a> {
    pub kind: String,
    /// The table without `kind` and `layers`.
    table: Spanned<DeValue<'a>>,
    layers: Option<Spanned<DeValue<'a>>>,
}

impl StageTable<'_> {
    /// The stage's settings: every key must be a field of `P`.
    pub fn params<P: DeserializeOwned>(&self) -> Result<P, Error> {
        Ok(P::deserialize(ValueDeserializer::from(self.table.clone()))?)
    }

    /// The `[stage.layers]` overrides, each pattern's table read as an `L`.
    pub fn layers<L: DeserializeOwned>(&self) -> Result<LayerRules<L>, Error> {
        let Some(layers) = &self.layers else {
            return Ok(LayerRules::default());
        };
        let table = layers.get_ref().as_table().ok_or_else(|| {
            Error::at(
                layers.span(),
                "layers must be a table of pattern = { settings }",
            )
        })?;
        let mut rules = Vec::new();
        for (pattern, value) in table.iter() {
            let v = L::deserialize(ValueDeserializer::from(value.clone()))?;
            rules.push((pattern.get_ref().to_string(), v));
        }
        Ok(LayerRules(rules))
    }

    /// Refuses `[stage.layers]` for a stage that has no per-layer settings.
    pub fn no_layers(&self) -> Result<(), Error> {
        match &self.layers {
            Some(l) => Err(Error::at(
                l.span(),
                format!("the {} stage has no per-layer settings", self.kind),
            )),
            None => Ok(()),
        }
    }
}

/// How the report measures every stage's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ReportSettings {
    /// Seconds spent measuring each latency figure.
    pub latency_seconds: f64,
    /// Batch sizes whose latency is measured.
    pub batches: Vec<usize>,
    /// Evaluate on the first N test images only (quick runs); all of them if absent.
    pub test_limit: Option<usize>,
}

impl ReportSettings {
    /// Refuses settings that cannot be measured.
    pub fn check(&self) -> Result<(), String> {
        if !(self.latency_seconds.is_finite() && self.latency_seconds > 0.0) {
            return Err(format!(
                "latency-seconds must be a positive number, got {}",
                self.latency_seconds
            ));
        }
        if self.batches.is_empty() || self.batches.contains(&0) {
            return Err("batches must list batch sizes of at least 1".into());
        }
        if self.test_limit == Some(0) {
            return Err("test-limit must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for ReportSettings {
    fn default() -> Self {
        ReportSettings {
            latency_seconds: 1.0,
            batches: vec![1, 64],
            test_limit: None,
        }
    }
}

/// A stage of a recipe with the line it starts on.
pub struct Entry {
    pub line: usize,
    pub stage: Box<dyn Stage>,
}

/// A parsed recipe.
pub struct Recipe {
    pub path: PathBuf,
    pub text: String,
    pub description: Option<String>,
    pub report: ReportSettings,
    pub stages: Vec<Entry>,
}

impl Recipe {
    /// Reads and parses a recipe file; errors name the line (`FILE:LINE:COL: ...`).
    pub fn read(path: &Path) -> anyhow::Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read recipe {}: {e}", path.display()))?;
        Recipe::parse(path, text)
    }

    /// Parses recipe `text` (read from `path`, which errors name).
    pub fn parse(path: &Path, text: String) -> anyhow::Result<Recipe> {
        let parsed = parse_text(&text);
        match parsed {
            Ok((description, report, stages)) => Ok(Recipe {
                path: path.to_path_buf(),
                description,
                report,
                stages,
                text,
            }),
            Err(e) => Err(anyhow::anyhow!(render(path, &text, &e))),
        }
    }

    /// The line a stage starts on, for messages about it.
    pub fn locate(&self, index: usize) -> String {
        format!("{}:{}", self.path.display(), self.stages[index].line)
    }
}

type Parsed = (Option<String>, ReportSettings, Vec<Entry>);

fn parse_text(text: &str) -> Result<Parsed, Error> {
    let root = DeTable::parse(text)?;
    let mut description = None;
    let mut report = ReportSettings::default();
    let mut stages = Vec::new();
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "description" => {
                description = Some(
                    value
                        .get_ref()
                        .as_str()
                        .ok_or_else(|| Error::at(value.span(), "description must be a string"))?
                        .to_string(),
                )
            }
            "report" => {
                report = ReportSettings::deserialize(ValueDeserializer::from(value.clone()))?;
                report
                    .check()
                    .map_err(|e| Error::at(value.span(), format!("[report]: {e}")))?;
            }
            "stage" => {
                let array = value.get_ref().as_array().ok_or_else(|| {
                    Error::at(value.span(), "stages are written [[stage]], one table each")
                })?;
                for item in array.iter() {
                    stages.push(parse_stage(text, item)?);
                }
            }
            other => {
                return Err(Error::at(
                    key.span(),
                    format!(
                        "unknown key {other:?}: a recipe has description, [report] and [[stage]] tables"
                    ),
                ));
            }
        }
    }
    if stages.is_empty() {
        return Err(Error {
            span: None,
            message: "the recipe has no [[stage]]: nothing to run".into(),
        });
    }
    Ok((description, report, stages))
}

fn parse_stage(text: &str, item: &Spanned<DeValue<'_>>) -> Result<Entry, Error> {
    let span = item.span();
    let mut table = item
        .get_ref()
        .as_table()
        .ok_or_else(|| Error::at(span.clone(), "a stage must be a table"))?
        .clone();
    let kind = table.remove("kind").ok_or_else(|| {
        Error::at(
            span.clone(),
            format!(
                "this stage has no kind: add kind = \"...\", one of {}",
                registry::names()
            ),
        )
    })?;
    let name = kind
        .get_ref()
        .as_str()
        .ok_or_else(|| Error::at(kind.span(), "kind must be a string"))?
        .to_string();
    let entry = registry::find(&name).ok_or_else(|| {
        Error::at(
            kind.span(),
            format!(
                "unknown stage {name:?}: the stages are {}",
                registry::names()
            ),
        )
    })?;
    let layers = table.remove("layers");
    let t = StageTable {
        kind: name,
        table: Spanned::new(span.clone(), DeValue::Table(table)),
        layers,
    };
    let stage = (entry.parse)(&t).map_err(|mut e| {
        e.message = format!("{} stage: {}", t.kind, e.message);
        e
    })?;
    Ok(Entry {
        line: line_col(text, span.start).0,
        stage,
    })
}
