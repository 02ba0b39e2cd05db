//! Runs a recipe into a run folder:
//!
//! - `recipe.toml`: the recipe as given; `resolved.json`: every stage with all its settings
//!   (defaults filled in), what `--resume` compares against;
//! - `stages/NN-kind/`: each stage's work (its training run, checkpoints, output file, the
//!   constraints beside it) and `stage.json`, its report entry, written last: a stage whose
//!   folder has it is finished;
//! - `metrics.jsonl`: one line per training epoch of every stage and one per finished stage;
//! - `report.json`, `report.md`, `plots/`: rewritten after every stage.
//!
//! Every stage is planned before the first one runs, so a recipe that cannot run is refused
//! with nothing done. A stage that fails leaves the finished ones intact; `--resume` skips
//! them (reading their outputs back) and reruns the failed one from its start.

use super::measure;
use super::recipe::Recipe;
use super::report::{Entry, Report};
use super::{Context, Model, Plan};
use crate::atomic_file::write_atomic;
use crate::run_folder::{Reuse, RunFolder};
use anyhow::{Context as _, bail};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a recipe runs and what it starts from.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    /// A checkpoint to start from instead of training one.
    pub from: Option<PathBuf>,
    /// Replace the run in `run_dir` (`--force`).
    pub force: bool,
    /// Continue the run in `run_dir`, skipping its finished stages.
    pub resume: bool,
}

/// The folder of stage `index` (0-based) of kind `kind`.
pub fn stage_dir(run_dir: &Path, index: usize, kind: &str) -> PathBuf {
    run_dir
        .join("stages")
        .join(format!("{:02}-{kind}", index + 1))
}

fn resolved(recipe: &Recipe, opts: &RunOptions, cx: &Context) -> serde_json::Value {
    serde_json::json!({
        "recipe": recipe.path,
        // Absolute, so a resume from another working directory compares the same file.
        "from": opts.from.as_ref().map(|p| {
            std::fs::canonicalize(p)
                .or_else(|_| std::path::absolute(p))
                .unwrap_or_else(|_| p.clone())
        }),
        "data_dir": cx.data_dir,
        "report": recipe.report,
        "stages": recipe.stages.iter().map(|e| serde_json::json!({
            "kind": e.stage.kind(),
            "line": e.line,
            "settings": e.stage.settings(),
        })).collect::<Vec<_>>(),
    })
}

/// Checks the whole recipe against the starting model before anything runs; errors name the
/// stage's recipe line and say how to fix it.
pub fn plan(recipe: &Recipe, input: Option<&Model>, cx: &Context) -> anyhow::Result<()> {
    let mut plan = input.map(Plan::of).unwrap_or_default();
    if let Some(m) = input {
        // The data every stage will use is read and checked against the model now (only a
        // train stage's plan reads it otherwise).
        measure::test_set(m, &cx.data_dir_for(m.meta()), recipe.report.test_limit)
            .with_context(|| format!("--from {}", m.file.display()))?;
    }
    let report_batches = |arch: &crate::models::Arch| -> anyhow::Result<()> {
        for &b in &recipe.report.batches {
            crate::resources::check_batch(arch, b, false, "batch in [report] batches")?;
        }
        Ok(())
    };
    if let Some(arch) = &plan.arch {
        report_batches(arch)?;
    }
    for (i, e) in recipe.stages.iter().enumerate() {
        plan = e.stage.plan(&plan, cx).map_err(|why| {
            anyhow::anyhow!(
                "{}: stage {} ({}): {why}",
                recipe.locate(i),
                i + 1,
                e.stage.kind()
            )
        })?;
        if let Some(arch) = &plan.arch {
            report_batches(arch)
                .with_context(|| format!("{}: stage {}", recipe.locate(i), i + 1))?;
        }
    }
    Ok(())
}

/// Runs `recipe` as `opts` says; returns the report it wrote.
pub fn run(recipe: &Recipe, opts: &RunOptions, cx: &Context) -> anyhow::Result<Report> {
    let input = match &opts.from {
        Some(path) => {
            Some(Model::open(path).with_context(|| format!("--from {}", path.display()))?)
        }
        None => None,
    };
    plan(recipe, input.as_ref(), cx)?;

    let run_dir = &opts.run_dir;
    let resolved_path = run_dir.join("resolved.json");
    let want = resolved(recipe, opts, cx);
    let inputs: Vec<&Path> = opts.from.iter().map(PathBuf::as_path).collect();
    let reuse = Reuse::from_flags(opts.resume, opts.force);
    let folder = RunFolder::open(run_dir, reuse, "--run-dir", true, &inputs)?;
    // Stage folders (and so the files that stage records name) are absolute: a resume from
    // another working directory finds them.
    let stages_root = folder.path().to_path_buf();
    if opts.resume {
        if !resolved_path.is_file() {
            bail!("cannot resume: {} holds no recipe run", run_dir.display());
        }
        let text = std::fs::read_to_string(&resolved_path)
            .with_context(|| format!("cannot read {}", resolved_path.display()))?;
        let had: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged", resolved_path.display()))?;
        if had["from"] != want["from"] {
            bail!(
                "cannot resume: the run started from {}, not {}",
                had["from"],
                want["from"]
            );
        }
        // Everything a resume reads is checked before the run folder is touched.
        for (i, e) in recipe.stages.iter().enumerate() {
            let record = stage_dir(&stages_root, i, e.stage.kind()).join("stage.json");
            let done = record.exists();
            if done {
                let entry = read_record(&record, &stages_root)?;
                Model::open(&entry.file).with_context(|| {
                    format!(
                        "cannot resume: stage {}'s model ({})",
                        i + 1,
                        record.display()
                    )
                })?;
            }
            if done && had["stages"].get(i) != want["stages"].get(i) {
                bail!(
                    "cannot resume: stage {} ({}) finished with other settings than {} gives now; use another --run-dir",
                    i + 1,
                    e.stage.kind(),
                    recipe.locate(i)
                );
            }
        }
    }
    write_atomic(&run_dir.join("recipe.toml"), recipe.text.as_bytes())?;
    write_atomic(
        &resolved_path,
        serde_json::to_string_pretty(&want)?.as_bytes(),
    )?;

    let mut report = Report {
        recipe: recipe.path.clone(),
        description: recipe.description.clone(),
        from: opts.from.clone(),
        threads: rayon::current_num_threads(),
        stages: Vec::new(),
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    if !opts.resume {
        write_atomic(&metrics_path, b"")?;
    }
    if let Some(m) = &input {
        // The starting point is entry 0, so ratios are taken against it.
        let (figures, layers) = measure::measure(m, cx, &recipe.report)?;
        report.stages.push(Entry {
            index: 0,
            kind: "from".into(),
            line: 0,
            settings: serde_json::json!({}),
            seconds: 0.0,
            file: m.file.clone(),
            figures,
            layers,
            details: serde_json::json!({}),
            curve: vec![],
        });
    }
    let mut model = input;
    let n = recipe.stages.len();
    // Once a stage runs again, every later one does too: its input has changed.
    let mut rerunning = false;
    for (i, e) in recipe.stages.iter().enumerate() {
        let kind = e.stage.kind();
        let dir = stage_dir(&stages_root, i, kind);
        let done = dir.join("stage.json");
        if done.exists() && !rerunning {
            let entry = read_record(&done, &stages_root)?;
            eprintln!(
                "stage {}/{n}: {kind} finished already ({})",
                i + 1,
                dir.display()
            );
            model = Some(Model::open(&entry.file)?);
            report.stages.push(entry);
            continue;
        }
        rerunning = true;
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        fs_err::create_dir_all(&dir)?;
        eprintln!(
            "stage {}/{n}: {kind} ({}), folder {}",
            i + 1,
            recipe.locate(i),
            dir.display()
        );
        let stage_cx = Context {
            dir: dir.clone(),
            ..cx.clone()
        };
        let started = Instant::now();
        let out = e
            .stage
            .run(model.take(), &stage_cx)
            .with_context(|| format!("stage {} ({kind}, {})", i + 1, recipe.locate(i)))?;
        let seconds = started.elapsed().as_secs_f64();
        out.model
            .constraints
            .check(&out.model.loaded.tensors)
            .map_err(|why| {
                anyhow::anyhow!(
                    "internal error: stage {} ({kind}) broke an earlier stage's constraint: {why}",
                    i + 1
                )
            })?;
        let (figures, layers) = measure::measure(&out.model, &stage_cx, &recipe.report)?;
        let ent = Entry {
            index: i + 1,
            kind: kind.into(),
            line: e.line,
            settings: e.stage.settings(),
            seconds,
            file: out.model.file.clone(),
            figures,
            layers,
            details: out.details,
            curve: out.curve,
        };
        write_record(&done, &ent, &stages_root)?;
        append_metrics(&metrics_path, &ent)?;
        eprintln!(
            "stage {}/{n}: {kind} done in {seconds:.1} s: test accuracy {:.2}%, {} bytes",
            i + 1,
            100.0 * ent.figures.test_acc,
            ent.figures.file_bytes
        );
        report.stages.push(ent);
        report.write(run_dir)?;
        model = Some(out.model);
    }
    report.write(run_dir)?;
    Ok(report)
}

/// A finished stage's record (`stage.json`). Its model file is stored relative to the run
/// folder, so a run folder that moved, or a resume from another working directory, finds it.
fn write_record(path: &Path, entry: &Entry, root: &Path) -> anyhow::Result<()> {
    let mut stored = entry.clone();
    let file = std::path::absolute(&entry.file).unwrap_or_else(|_| entry.file.clone());
    stored.file = match file.strip_prefix(root) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => file,
    };
    write_atomic(path, serde_json::to_string_pretty(&stored)?.as_bytes())?;
    Ok(())
}

/// [`write_record`]'s record read back, its model file made absolute again.
fn read_record(path: &Path, root: &Path) -> anyhow::Result<Entry> {
    let mut entry: Entry = serde_json::from_str(&fs_err::read_to_string(path)?)
        .with_context(|| format!("{} is damaged", path.display()))?;
    if entry.file.is_relative() {
        entry.file = root.join(&entry.file);
    }
    Ok(entry)
}

/// One line per training epoch of the stage, then one with the stage's figures.
fn append_metrics(path: &Path, e: &Entry) -> anyhow::Result<()> {
    let mut f = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for m in &e.curve {
        let mut v = serde_json::to_value(m)?;
        v["stage"] = e.index.into();
        v["kind"] = e.kind.clone().into();
        writeln!(f, "{v}")?;
    }
    writeln!(
        f,
        "{}",
        serde_json::json!({"stage": e.index, "kind": e.kind, "seconds": e.seconds, "figures": e.figures})
    )?;
    Ok(())
}
