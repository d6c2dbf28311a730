//! Turning what a user writes after `--model` into folders on disk.
//!
//! Built-in names resolve to the embedded shapes-world models in `assets/tinyworld/`, found by
//! walking up from the working directory (so any folder inside the repository works), then
//! beside the executable's source tree, then `$LORAGATE_ASSETS`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The built-in model names and what they are.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[
    ("tiny", "the shapes world's tiny-sd (SD 1.x layout, 128 px)"),
    ("tiny-sticker", "tiny-sd with the UNet fine-tuned on the sticker look (base model B)"),
];

/// The built-in CLIP scorer.
pub const BUILTIN_SCORER: &str = "tiny-clip";

/// A pipeline to load: a diffusers folder, optionally with another folder's UNet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelLocation {
    /// The name the user wrote (`tiny`, or the path as given).
    pub name: String,
    pub folder: PathBuf,
    pub unet_folder: Option<PathBuf>,
}

/// Finds `assets/tinyworld`.
pub fn assets_dir() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("LORAGATE_ASSETS") {
        let p = PathBuf::from(p);
        if p.join("tiny-sd").is_dir() {
            return Ok(p);
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let p = dir.join("assets").join("tinyworld");
            if p.join("tiny-sd").is_dir() {
                return Ok(p);
            }
        }
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("tinyworld");
    if built.join("tiny-sd").is_dir() {
        return Ok(built);
    }
    Err(Error::model(
        "assets/tinyworld",
        "the embedded models were not found: run inside the loragate repository, or set LORAGATE_ASSETS \
         to the assets/tinyworld folder",
    ))
}

/// Resolves a model argument: a built-in name or a diffusers pipeline folder.
pub fn resolve_model(arg: &str) -> Result<ModelLocation> {
    match arg {
        "tiny" | "tiny-sd" => {
            let a = assets_dir()?;
            Ok(ModelLocation { name: "tiny".into(), folder: a.join("tiny-sd"), unet_folder: None })
        }
        "tiny-sticker" | "tiny-sd-sticker" => {
            let a = assets_dir()?;
            Ok(ModelLocation {
                name: "tiny-sticker".into(),
                folder: a.join("tiny-sd"),
                unet_folder: Some(a.join("tiny-sd-sticker").join("unet")),
            })
        }
        path => {
            let p = PathBuf::from(path);
            if p.join("model_index.json").is_file() || p.join("unet").is_dir() {
                return Ok(ModelLocation { name: path.to_string(), folder: p, unet_folder: None });
            }
            if p.exists() {
                return Err(Error::model(&p, "not a diffusers pipeline folder (no model_index.json or unet/)"));
            }
            if path.contains(['/', '\\']) || path.starts_with('.') {
                return Err(Error::model(&p, "model folder not found (is it downloaded, and is the path right?)"));
            }
            let known: Vec<&str> = BUILTIN_MODELS.iter().map(|(n, _)| *n).collect();
            Err(Error::invalid(format!(
                "unknown model `{path}`: not a folder, and not a built-in name ({})",
                known.join(", ")
            )))
        }
    }
}

/// Resolves a CLIP scorer argument: `tiny-clip` or a folder in the transformers `CLIPModel` layout.
pub fn resolve_scorer(arg: &str) -> Result<PathBuf> {
    if arg == BUILTIN_SCORER {
        return Ok(assets_dir()?.join("tiny-clip"));
    }
    let p = PathBuf::from(arg);
    if p.join("config.json").is_file() {
        return Ok(p);
    }
    Err(Error::invalid(format!(
        "unknown CLIP scorer `{arg}`: not a folder with config.json, and not `{BUILTIN_SCORER}`"
    )))
}
