//! Turning what a user writes after `--model` into files on disk, offline.
//!
//! - Built-in names resolve to the demo shapes-world models in `assets/tinyworld/` of a loragate
//!   checkout: `$LORAGATE_ASSETS` when it is set (and then only there), else the first
//!   `assets/` found walking up from the working directory (any folder inside the repository),
//!   else the source tree the binary was built from. An installed binary needs none of this for
//!   models of its own: the one asset it always needs, CLIP's merge list, is compiled in.
//! - A folder is a diffusers pipeline folder.
//! - A `.safetensors` file is a single-file checkpoint (A1111/ComfyUI), converted in memory.
//! - `org/name` (optionally `@revision`) is looked up in the Hugging Face cache
//!   (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`), never downloaded.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The built-in model names and what they are.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[
    ("tiny", "the shapes world's tiny-sd (SD 1.x layout, 128 px)"),
    ("tiny-sticker", "tiny-sd with the UNet fine-tuned on the sticker look (base model B)"),
];

/// The built-in CLIP scorer.
pub const BUILTIN_SCORER: &str = "tiny-clip";

/// A pipeline to load.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelLocation {
    /// The name the user wrote (`tiny`, a path, `org/name`).
    pub name: String,
    /// The diffusers folder (for a single file: the folder that holds it).
    pub folder: PathBuf,
    /// Another folder's UNet to use instead of `folder/unet` (the sticker fine-tune).
    pub unet_folder: Option<PathBuf>,
    /// A single-file checkpoint to convert instead of reading `folder`.
    pub single_file: Option<PathBuf>,
    /// Where a single file's configs come from (`--config`): a diffusers folder (configs and
    /// tokenizer) or an LDM `original_config` YAML.
    pub config: Option<PathBuf>,
}

impl ModelLocation {
    fn folder(name: &str, folder: PathBuf) -> Self {
        ModelLocation { name: name.to_string(), folder, unet_folder: None, single_file: None, config: None }
    }
}

/// Resolves `--config` for a single file: a diffusers folder, a hub id in the cache, or an LDM
/// `original_config` YAML.
pub fn resolve_config(arg: &str) -> Result<PathBuf> {
    let p = PathBuf::from(arg);
    if p.is_file() {
        let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        if ext == "yaml" || ext == "yml" {
            return Ok(p);
        }
        return Err(Error::invalid(format!("--config {arg}: a file must be an LDM original config (.yaml); configs of a diffusers model are given as its folder")));
    }
    if p.is_dir() {
        if p.join("unet").join("config.json").is_file() {
            return Ok(p);
        }
        return Err(Error::model(&p, "--config: not a diffusers pipeline folder (no unet/config.json)"));
    }
    if looks_like_hub_id(arg) {
        return resolve_hub_id(arg);
    }
    Err(Error::model(&p, "--config: no such folder or file"))
}

/// [`resolve_model`] with the configs of a single file given (`--config`).
pub fn resolve_model_with_config(arg: &str, config: Option<&str>) -> Result<ModelLocation> {
    let mut loc = resolve_model(arg)?;
    if let Some(c) = config {
        if loc.single_file.is_none() {
            return Err(Error::invalid(format!("--config {c}: only a single-file checkpoint takes configs from elsewhere; `{arg}` is a folder with its own")));
        }
        loc.config = Some(resolve_config(c)?);
    }
    Ok(loc)
}

/// What an installed user is told when the demo models are not where they look.
const DEMO_MODELS_HINT: &str = "the demo models (tiny, tiny-sticker, tiny-clip) live in the assets/ folder of the loragate repository: \
     clone it and set LORAGATE_ASSETS to that folder (or run inside the checkout); your own models need none of it: \
     a diffusers folder, a single file with --config, or a cached hub id";

/// Finds the `assets/` folder of the repository.
pub fn assets_root() -> Result<PathBuf> {
    let ok = |p: &Path| p.join("tinyworld").join("tiny-sd").is_dir();
    if let Ok(p) = std::env::var("LORAGATE_ASSETS")
        && !p.is_empty()
    {
        let p = PathBuf::from(p);
        // Accept both `assets/` and `assets/tinyworld/`.
        if ok(&p) {
            return Ok(p);
        }
        if let Some(parent) = p.parent().filter(|parent| ok(parent)) {
            return Ok(parent.to_path_buf());
        }
        // Set but wrong: say so rather than quietly take the models from somewhere else.
        return Err(Error::model(&p, format!("LORAGATE_ASSETS has no tinyworld/tiny-sd; {DEMO_MODELS_HINT}")));
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let p = dir.join("assets");
            if ok(&p) {
                return Ok(p);
            }
        }
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    if ok(&built) {
        return Ok(built);
    }
    Err(Error::model("assets/tinyworld", format!("not found; {DEMO_MODELS_HINT}")))
}

/// Finds `assets/tinyworld`.
pub fn assets_dir() -> Result<PathBuf> {
    Ok(assets_root()?.join("tinyworld"))
}

/// The Hugging Face hub cache folder, as huggingface_hub finds it.
pub fn hf_hub_cache() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HUGGINGFACE_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(home) = std::env::var("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache"));
    base.join("huggingface").join("hub")
}

/// Does `arg` look like a hub id (`org/name`, `org/name@rev`) rather than a path?
pub fn looks_like_hub_id(arg: &str) -> bool {
    let id = arg.split('@').next().unwrap_or(arg);
    let parts: Vec<&str> = id.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        && !id.starts_with('.')
        && !arg.contains('\\')
}

/// Resolves `org/name[@rev]` to its snapshot folder in the hub cache.
pub fn resolve_hub_id(arg: &str) -> Result<PathBuf> {
    let (id, rev) = match arg.split_once('@') {
        Some((i, r)) => (i, r.to_string()),
        None => (arg, "main".to_string()),
    };
    let cache = hf_hub_cache();
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let how = format!(
        "download it where the network is reachable (`huggingface-cli download {id}` or `hf download {id}`) and \
         copy the cache here, or point HF_HUB_CACHE / HF_HOME at a cache that has it"
    );
    if !repo.is_dir() {
        return Err(Error::model(&repo, format!("`{id}` is not in the Hugging Face cache ({}); {how}", cache.display())));
    }
    // A branch or tag name resolves through refs/; a commit hash names the snapshot directly.
    let commit = match std::fs::read_to_string(repo.join("refs").join(&rev)) {
        Ok(c) => c.trim().to_string(),
        Err(_) => rev.clone(),
    };
    let snap = repo.join("snapshots").join(&commit);
    if snap.is_dir() {
        return Ok(snap);
    }
    Err(Error::model(&repo, format!("revision `{rev}` of `{id}` is not in the cache; {how}")))
}

/// Resolves a model argument (see the module docs).
pub fn resolve_model(arg: &str) -> Result<ModelLocation> {
    match arg {
        "tiny" | "tiny-sd" => Ok(ModelLocation::folder("tiny", assets_dir()?.join("tiny-sd"))),
        "tiny-sticker" | "tiny-sd-sticker" => {
            let a = assets_dir()?;
            Ok(ModelLocation { unet_folder: Some(a.join("tiny-sd-sticker").join("unet")), ..ModelLocation::folder("tiny-sticker", a.join("tiny-sd")) })
        }
        path => {
            let p = PathBuf::from(path);
            if p.is_file() {
                let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
                return match ext.as_str() {
                    "safetensors" => Ok(ModelLocation {
                        single_file: Some(p.clone()),
                        ..ModelLocation::folder(path, p.parent().map(Path::to_path_buf).unwrap_or_default())
                    }),
                    "ckpt" | "pt" | "pth" | "bin" => Err(Error::model(
                        &p,
                        "PyTorch pickle checkpoints are not loaded (they can run code); convert it to .safetensors first",
                    )),
                    _ => Err(Error::model(&p, "not a .safetensors checkpoint")),
                };
            }
            if p.join("model_index.json").is_file() || p.join("unet").is_dir() {
                return Ok(ModelLocation::folder(path, p));
            }
            if p.exists() {
                return Err(Error::model(&p, "not a diffusers pipeline folder (no model_index.json or unet/)"));
            }
            if looks_like_hub_id(path) {
                return Ok(ModelLocation::folder(path, resolve_hub_id(path)?));
            }
            if path.contains(['/', '\\']) || path.starts_with('.') {
                return Err(Error::model(&p, "model folder not found (is it downloaded, and is the path right?)"));
            }
            let known: Vec<&str> = BUILTIN_MODELS.iter().map(|(n, _)| *n).collect();
            Err(Error::invalid(format!(
                "unknown model `{path}`: not a file or folder, not a built-in name ({}), not a hub id (org/name)",
                known.join(", ")
            )))
        }
    }
}

/// Resolves a CLIP scorer argument: `tiny-clip`, a folder in the transformers `CLIPModel`
/// layout, or a hub id (`openai/clip-vit-large-patch14`) in the cache.
pub fn resolve_scorer(arg: &str) -> Result<PathBuf> {
    if arg == BUILTIN_SCORER {
        return Ok(assets_dir()?.join("tiny-clip"));
    }
    let p = PathBuf::from(arg);
    if p.join("config.json").is_file() {
        return Ok(p);
    }
    if !p.exists() && looks_like_hub_id(arg) {
        return resolve_hub_id(arg);
    }
    Err(Error::invalid(format!(
        "unknown scorer `{arg}`: not a folder with config.json, not a cached hub id, and not `{BUILTIN_SCORER}`"
    )))
}

/// The kinds of scorer model a folder can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorerKind {
    /// transformers `CLIPModel`: text and image embeddings.
    Clip,
    /// transformers `Dinov2Model`: image embeddings only.
    Dinov2,
}

/// What a scorer folder holds, from its `config.json`'s `model_type`.
pub fn scorer_kind(dir: &Path) -> Result<ScorerKind> {
    let file = dir.join("config.json");
    let v: serde_json::Value = super::loading::read_config(&file)?;
    match v["model_type"].as_str() {
        Some("clip") => Ok(ScorerKind::Clip),
        Some("dinov2") => Ok(ScorerKind::Dinov2),
        other => Err(Error::model(
            &file,
            format!("a `{}` model is not a scorer: scorers are CLIP (`CLIPModel`) or DINOv2 (`Dinov2Model`) folders", other.unwrap_or("model without model_type")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("stabilityai/stable-diffusion-xl-base-1.0"));
        assert!(looks_like_hub_id("openai/clip-vit-base-patch32@main"));
        assert!(!looks_like_hub_id("./models/sd15"));
        assert!(!looks_like_hub_id("models/sd15/unet"));
        assert!(!looks_like_hub_id("tiny"));
    }
}
