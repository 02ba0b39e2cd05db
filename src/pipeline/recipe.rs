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

use super::measure::ReportSettings;
use super::table::{Error, StageTable};
use super::{Stage, registry};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

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
