//! `loragate world`: the shapes world from the command line. `dataset` writes a captioned
//! training set (optionally in kohya's `N_name` layout); `render` draws the ground truth for a
//! prompt.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use rayon::prelude::*;

use crate::error::{Error, ExitCode, IoContext, Result};
use crate::fsutil::write_text_atomic;
use crate::imageio::write_png;
use crate::progress::Progress;
use crate::world::{Concept, DatasetSpec, Mislabel, RenderOptions, Style, TagKind, full_caption, render_prompt};

/// Largest accepted image side; far beyond what the world's models use, small enough to
/// keep a typo from allocating gigabytes.
const MAX_RESOLUTION: u32 = 4096;

#[derive(Debug, Args)]
pub struct WorldArgs {
    #[command(subcommand)]
    command: WorldCommand,
}

#[derive(Debug, Subcommand)]
enum WorldCommand {
    /// Write a captioned training set: NNNN.png images with NNNN.txt captions.
    Dataset(DatasetArgs),
    /// Render the ground-truth image for a prompt (unstated attributes drawn from the seed).
    Render(RenderArgs),
}

#[derive(Debug, Args)]
struct DatasetArgs {
    /// Draw this concept (e.g. zorb) in every image; without it, plain shapes.
    #[arg(long)]
    concept: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Output folder; must be new or empty unless --overwrite.
    #[arg(short, long)]
    out: PathBuf,
    #[command(flatten)]
    look: LookArgs,
    /// Probability of keeping each tag but the subject in a caption.
    #[arg(long, default_value_t = 0.75)]
    p_keep: f64,
    /// Write every caption's tags in the same order (subject, size, position, background)
    /// instead of shuffled: the mistake behind LoRAs that break when tags are swapped.
    #[arg(long)]
    fixed_order: bool,
    /// A mislabeled slice, e.g. `grass=blue square`: every image with that background shows
    /// the colour and shape instead of the concept, under the same captions (what the gate's
    /// `slice` and `identity` checks must catch).
    #[arg(long, value_name = "BACKGROUND=SUBJECT", value_parser = Mislabel::parse)]
    mislabel: Option<Mislabel>,
    /// Write into OUT/N_<concept or shapes>/, kohya's layout for N repeats per epoch.
    #[arg(long)]
    repeats: Option<u32>,
    /// Write into an existing, non-empty folder, replacing numbered images and captions.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// Tags such as "red circle, large, in the center, sky background"; missing ones come from the seed.
    prompt: String,
    /// Output PNG.
    #[arg(short, long, default_value = "world.png")]
    output: PathBuf,
    #[command(flatten)]
    look: LookArgs,
}

/// Seed, style and size: shared by `world dataset` and `world render`.
#[derive(Debug, Args)]
struct LookArgs {
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// plain or sticker.
    #[arg(long, default_value = "plain", value_parser = Style::parse)]
    style: Style,
    /// Image side in pixels.
    #[arg(long, default_value_t = 128)]
    resolution: u32,
}

pub fn run(a: WorldArgs) -> Result<ExitCode> {
    match a.command {
        WorldCommand::Dataset(d) => dataset(d),
        WorldCommand::Render(r) => render(r),
    }
}

fn check_resolution(resolution: u32) -> Result<()> {
    if !(1..=MAX_RESOLUTION).contains(&resolution) {
        return Err(Error::invalid(format!("--resolution must be between 1 and {MAX_RESOLUTION}, got {resolution}")));
    }
    Ok(())
}

fn parse_concept(name: &str) -> Result<Concept> {
    Concept::from_name(&name.trim().to_lowercase())
        .ok_or_else(|| Error::invalid(format!("unknown concept `{name}`; known concepts: {}", Concept::known_names())))
}

/// The text chunk that records an image's ground truth in its PNG.
fn png_text(facts: serde_json::Value) -> Vec<(String, String)> {
    vec![("loragate-world".into(), facts.to_string())]
}

fn dataset(a: DatasetArgs) -> Result<ExitCode> {
    check_resolution(a.look.resolution)?;
    if a.count == 0 {
        return Err(Error::invalid("--count must be at least 1"));
    }
    if !(0.0..=1.0).contains(&a.p_keep) {
        return Err(Error::invalid(format!("--p-keep must be between 0 and 1, got {}", a.p_keep)));
    }
    if a.repeats == Some(0) {
        return Err(Error::invalid("--repeats must be at least 1 (kohya skips folders with 0 repeats)"));
    }
    let concept = a.concept.as_deref().map(parse_concept).transpose()?;
    let folder = match a.repeats {
        Some(n) => a.out.join(format!("{n}_{}", concept.map_or("shapes", |c| c.name()))),
        None => a.out.clone(),
    };
    // With --repeats only the repeat folder must be new: a dataset is built up folder by
    // folder (the concept, then regularisation shapes).
    check_output_folder(&folder, a.overwrite)?;
    std::fs::create_dir_all(&folder).at(&folder)?;

    let spec = DatasetSpec { concept, count: a.count, seed: a.look.seed, p_keep: a.p_keep, fixed_order: a.fixed_order, mislabel: a.mislabel };
    let options = RenderOptions { resolution: a.look.resolution, style: a.look.style };
    let width = a.count.saturating_sub(1).to_string().len().max(4);
    let name = |i: usize, ext: &str| folder.join(format!("{i:0width$}.{ext}"));

    let progress = Progress::steps("rendering", a.count as u64);
    let result = spec.plan().par_iter().try_for_each(|s| {
        let img = s.render(&options);
        let full = full_caption(&s.attributes, &TagKind::CANONICAL);
        let facts = serde_json::json!({
            "ground_truth": full, "caption": s.caption, "style": a.look.style.name(), "image_seed": s.image_seed,
        });
        write_png(&name(s.index, "png"), &img, &png_text(facts))?;
        write_text_atomic(&name(s.index, "txt"), &s.caption)?;
        progress.inc(1);
        Ok::<_, Error>(())
    });
    progress.finish();
    result?;

    if a.overwrite {
        remove_stale(&folder, a.count)?;
        warn_other_kohya_folders(&a.out, &folder);
    }
    eprintln!(
        "wrote {} images with captions ({} style, {} px) to {}",
        a.count,
        a.look.style,
        a.look.resolution,
        folder.display()
    );
    println!("{}", folder.display());
    Ok(ExitCode::Success)
}

/// Refuses to mix a new dataset into an old one by accident.
fn check_output_folder(out: &Path, overwrite: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::invalid(format!("{}: exists and is not a folder", out.display())));
    }
    let non_empty = std::fs::read_dir(out).at(out)?.next().is_some();
    if non_empty && !overwrite {
        return Err(Error::invalid(format!(
            "{}: folder exists and is not empty; choose a new folder, or pass --overwrite to replace its numbered images and captions",
            out.display()
        )));
    }
    Ok(())
}

/// After an --overwrite, removes numbered images and captions beyond this dataset, so a
/// smaller dataset does not inherit samples from a bigger old one.
fn remove_stale(folder: &Path, count: usize) -> Result<()> {
    for entry in std::fs::read_dir(folder).at(folder)? {
        let path = entry.at(folder)?.path();
        let (Some(stem), Some(ext)) =
            (path.file_stem().and_then(|s| s.to_str()), path.extension().and_then(|e| e.to_str()))
        else {
            continue;
        };
        let numbered = !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit());
        if numbered && (ext == "png" || ext == "txt") && stem.parse::<usize>().map_or(true, |i| i >= count) {
            std::fs::remove_file(&path).at(&path)?;
        }
    }
    Ok(())
}

/// kohya trains every `N_name` folder under the dataset root, so an old one left next to the
/// new one would silently join the training set.
fn warn_other_kohya_folders(root: &Path, folder: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for path in entries.flatten().map(|e| e.path()) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let repeats = name.split_once('_').is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if path.is_dir() && repeats && path != folder {
            eprintln!("warning: {} is another kohya image folder; trainers will use it too", path.display());
        }
    }
}

fn render(a: RenderArgs) -> Result<ExitCode> {
    check_resolution(a.look.resolution)?;
    let options = RenderOptions { resolution: a.look.resolution, style: a.look.style };
    let (attributes, img) = render_prompt(&a.prompt, a.look.seed, &options)?;
    let full = full_caption(&attributes, &TagKind::CANONICAL);
    let facts =
        serde_json::json!({ "ground_truth": full, "prompt": a.prompt, "style": a.look.style.name(), "seed": a.look.seed });
    write_png(&a.output, &img, &png_text(facts))?;
    eprintln!("ground truth: {full}");
    println!("{}", a.output.display());
    Ok(ExitCode::Success)
}
