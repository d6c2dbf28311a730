use std::path::PathBuf;

use clap::Args;

use crate::device::{parse_device, parse_dtype};
use crate::error::{Error, ExitCode, Result};
use crate::baseline::UpdateMode;
use crate::harness::{NoChecks, RunOptions, project_root, run_suite};
use crate::report;
use crate::suite::{find_suite, load_suite};

#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// The suite file; `portrait.yaml` or `portrait` also finds `suites/portrait.yaml`.
    suite: String,
    /// When to write under baselines/: `never`, `pending` (new and changed images as .new files
    /// for review) or `always` (over the baselines). Default: `never` where the CI variable is
    /// set, else `pending`.
    #[arg(long, value_name = "MODE", value_parser = UpdateMode::parse)]
    update_baselines: Option<UpdateMode>,
    /// The same as `--update-baselines never`.
    #[arg(long, conflicts_with = "update_baselines")]
    ci: bool,
    /// What a run that selects no case does: `fail` (exit 2, the default) or `warn` (say so and
    /// pass, for an empty partition of a small suite).
    #[arg(long, value_name = "ACTION", default_value = "fail", value_parser = parse_no_checks)]
    no_checks: NoChecks,
    /// Where reports and images go. Default: out/<suite>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The baselines folder. Default: baselines/ in the project that holds the suite.
    #[arg(long)]
    baselines: Option<PathBuf>,
    /// Image cache folder. Default: $LORAGATE_CACHE or .loragate/cache in the project.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Regenerate everything; do not read or write the cache.
    #[arg(long)]
    no_cache: bool,
    /// Run partition N of M (cases dealt by a stable hash of their names, identity groups kept
    /// together).
    #[arg(long, value_parser = parse_partition)]
    partition: Option<(usize, usize)>,
    /// Only cases whose name contains this (plus the cases identity groups join to them).
    #[arg(long = "case")]
    filter: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or f16/bf16 on a GPU.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Decode in f32 while the rest computes in f16/bf16 (the SD VAE overflows in f16; without
    /// this, an image whose decode overflows is decoded again in f32, and the run says so).
    #[arg(long, value_name = "DTYPE")]
    vae_dtype: Option<String>,
    /// Images per UNet batch (guidance doubles it).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Only validate the suite and print its plan; generate nothing.
    #[arg(long)]
    check: bool,
    /// Run with another file for one of the suite's LoRAs, e.g. `--lora zorb=new.safetensors`
    /// (repeatable). Baselines stay untouched: they belong to the committed files.
    #[arg(long = "lora", value_name = "NAME=FILE")]
    loras: Vec<String>,
}

/// Replaces the files of the suite's LoRAs named in `--lora NAME=FILE` options.
fn override_loras(suite: &mut crate::suite::Suite, overrides: &[String]) -> Result<()> {
    use crate::suite::TrainingSet;
    for o in overrides {
        let (name, file) = o
            .split_once('=')
            .ok_or_else(|| Error::invalid(format!("--lora `{o}`: expected NAME=FILE, e.g. --lora zorb=out/zorb-step900.safetensors")))?;
        let names: Vec<&str> = suite.loras.iter().map(|l| l.name.as_str()).collect();
        let Some(i) = suite.loras.iter().position(|l| l.name == name) else {
            return Err(Error::invalid(format!(
                "--lora `{o}`: the suite has no LoRA named `{name}` (it has: {})",
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            )));
        };
        suite.loras[i].file = std::sync::Arc::new(crate::lora::LoraFile::load(std::path::Path::new(file))?);
        // A training set the old file's metadata named is the new file's to name.
        let l = &mut suite.loras[i];
        if matches!(l.training_set, TrainingSet::Missing(_) | TrainingSet::Folder { from_metadata: true, .. }) {
            let dir = suite.file.parent().unwrap_or(std::path::Path::new("."));
            l.training_set = crate::suite::validate::training_set_from_metadata(l.name.as_str(), &l.file, dir);
        }
    }
    Ok(())
}

fn parse_partition(s: &str) -> std::result::Result<(usize, usize), String> {
    let s = s.strip_prefix("count:").unwrap_or(s);
    let (n, m) = s.split_once('/').ok_or_else(|| format!("`{s}` is not N/M, e.g. 1/3"))?;
    let (n, m): (usize, usize) = (n.parse().map_err(|_| format!("bad N in `{s}`"))?, m.parse().map_err(|_| format!("bad M in `{s}`"))?);
    if n == 0 || m == 0 || n > m {
        return Err(format!("partition {n}/{m}: need 1 ≤ N ≤ M"));
    }
    Ok((n, m))
}

fn parse_no_checks(s: &str) -> std::result::Result<NoChecks, String> {
    match s {
        "fail" => Ok(NoChecks::Fail),
        "warn" | "pass" => Ok(NoChecks::Warn),
        _ => Err(format!("`{s}`: use fail or warn")),
    }
}

pub fn run(a: SuiteArgs) -> Result<ExitCode> {
    let path = find_suite(&a.suite).ok_or_else(|| {
        Error::invalid(format!("suite `{}` not found (looked for it as given and under suites/)", a.suite))
    })?;
    let mut suite = load_suite(&path)?;
    override_loras(&mut suite, &a.loras)?;
    if a.check {
        let plan = crate::suite::expand::expand(&suite)?;
        println!("{}: {} cases, {} images to generate or find in the cache", suite.name, suite.cases.len(), plan.jobs.len());
        for cp in &plan.cases {
            let c = &suite.cases[cp.case];
            let n: usize = cp.variants.iter().map(|v| v.images.len() + v.controls.len()).sum();
            println!("  {:<28} {:<10} {} variants, {n} images", c.name, c.variant.kind(), cp.variants.len());
        }
        return Ok(ExitCode::Success);
    }
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype, &device)?;
    let vae_dtype = a.vae_dtype.as_deref().map(|v| crate::device::parse_vae_dtype(v, &device)).transpose()?.filter(|v| *v != dtype);
    let root = project_root(&path);
    let mut update = if a.ci { UpdateMode::Never } else { a.update_baselines.unwrap_or_else(UpdateMode::default_for_environment) };
    if !a.loras.is_empty() {
        // Baselines belong to the suite's own files: a run with swapped LoRAs writes nothing.
        if a.update_baselines.is_some_and(|u| u != UpdateMode::Never) {
            return Err(Error::invalid("--lora swaps in files the baselines do not belong to: it cannot be combined with --update-baselines pending or always"));
        }
        update = UpdateMode::Never;
    }
    let opts = RunOptions {
        update,
        no_checks: a.no_checks,
        device,
        dtype,
        vae_dtype,
        cache_dir: if a.no_cache { None } else { Some(a.cache_dir.clone().unwrap_or_else(|| crate::harness::cache::default_cache_dir(&path))) },
        baselines_dir: a.baselines.clone().unwrap_or_else(|| root.join("baselines")),
        partition: a.partition,
        filter: a.filter.clone(),
        max_batch: a.max_batch,
        progress: true,
    };
    let outcome = run_suite(&suite, &opts)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let base = suite.name.under(&root.join("out"));
        match a.partition {
            Some((n, m)) => base.join(format!("partition-{n}-of-{m}")),
            None => base,
        }
    });
    let paths = report::write_all(&outcome, &out)?;
    let width = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(120);
    print!("{}", report::console::table(&outcome, width));
    for w in &outcome.warnings {
        eprintln!("warning: {w}");
    }
    println!("report: {}\njunit:  {}", paths.html.display(), paths.junit.display());
    if !outcome.pending.is_empty() {
        match update {
            UpdateMode::Always => println!("{} files written over the baselines under {}", outcome.pending.len(), outcome.baseline_dir.display()),
            _ => println!("{} files pending review: loragate baseline review {}", outcome.pending.len(), suite.name),
        }
    }
    Ok(if outcome.failed() > 0 { ExitCode::CheckFailed } else { ExitCode::Success })
}
