//! Command-line interface: clap definitions, one file per subcommand.

mod baseline;
mod bench;
mod convert;
mod generate;
mod init;
mod inspect;
mod junit;
mod review;
pub mod schema;
mod suite;
mod train;
mod world;

use clap::{Parser, Subcommand};

use crate::device::Workload;
use crate::error::{ExitCode, Result};

#[derive(Debug, Parser)]
#[command(name = "loragate", version, about = "Test LoRA checkpoints for Stable Diffusion like build artifacts")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

// The arguments are parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt, optionally with LoRAs.
    Generate(generate::GenerateArgs),
    /// Gate the LoRAs of a repository: a starter suite per LoRA file (from its metadata) and a
    /// workflow that uses the loragate action.
    Init(init::InitArgs),
    /// Describe a LoRA file: format, rank, alpha, targets, probable base family, metadata.
    Inspect(inspect::InspectArgs),
    /// Run a prompt suite: generate, score, check, compare with baselines, report.
    Suite(suite::SuiteArgs),
    /// Review, accept or reject pending baseline images.
    Baseline(baseline::BaselineArgs),
    /// The review gate: fails while suite runs have images or measurements to review.
    Review(review::ReviewArgs),
    /// Print the JSON Schema of suite files.
    Schema(schema::SchemaArgs),
    /// Merge JUnit files of partitioned runs into one.
    MergeJunit(junit::MergeJunitArgs),
    /// Merge the reports (HTML, JUnit, summary) of a suite's partitions into one.
    MergeReport(junit::MergeReportArgs),
    /// The shapes world: write training sets, render the ground truth for a prompt.
    World(world::WorldArgs),
    /// Train a LoRA; checkpoints are validated by a suite.
    Train(train::TrainArgs),
    /// Measure: parity on a device, txt2img and UNet speed (one JSON object).
    Bench(bench::BenchArgs),
    /// Convert a single-file checkpoint to a diffusers folder, or a folder to a single file.
    Convert(convert::ConvertArgs),
}

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<ExitCode> {
    // Parsing starts no thread, so the process is still prepared before any does.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { ExitCode::Usage } else { ExitCode::Success };
            let _ = e.print();
            return Ok(code);
        }
    };
    let workload = if matches!(cli.command, Command::Train(_)) { Workload::Training } else { Workload::Inference };
    crate::device::prepare_process(workload);
    // A kernel build the CPU lacks (`LORAGATE_KERNELS`) is a usage error before any work.
    crate::model::kernels::init_from_env()?;
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Init(a) => init::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Suite(a) => suite::run(a),
        Command::Baseline(a) => baseline::run(a),
        Command::Review(a) => review::run(a),
        Command::Schema(a) => schema::run(a),
        Command::MergeJunit(a) => junit::run(a),
        Command::MergeReport(a) => junit::merge_report(a),
        Command::World(a) => world::run(a),
        Command::Train(a) => train::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
    }
}

/// `FILE[:WEIGHT]`: the weight is split off only when it parses as a number, so paths with
/// colons still work.
pub(crate) fn parse_lora_arg(s: &str) -> std::result::Result<(std::path::PathBuf, f64), String> {
    if let Some((file, w)) = s.rsplit_once(':')
        && let Ok(w) = w.parse::<f64>() {
            if !w.is_finite() {
                return Err(format!("weight `{w}` is not a finite number"));
            }
            return Ok((file.into(), w));
        }
    Ok((s.into(), 1.0))
}

/// `WxH`, e.g. `128x128`.
pub(crate) fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(|| format!("`{s}` is not WIDTHxHEIGHT, e.g. 128x128"))?;
    let w = w.trim().parse().map_err(|_| format!("bad width in `{s}`"))?;
    let h = h.trim().parse().map_err(|_| format!("bad height in `{s}`"))?;
    Ok((w, h))
}
