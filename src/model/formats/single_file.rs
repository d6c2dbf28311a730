//! Single-file checkpoints (A1111 / ComfyUI `.safetensors`) ↔ the diffusers layout, in memory.
//!
//! A single file holds the UNet under `model.diffusion_model.*` (LDM names), the VAE under
//! `first_stage_model.*`, and the text encoder(s) under `cond_stage_model.*` (SD 1.x: a
//! transformers CLIP; SD 2.x: OpenCLIP) or `conditioner.embedders.{0,1}.*` (SDXL). The family is
//! detected from the keys and shapes; configs come from the family's published architecture,
//! or from a `loragate.configs` header field when loragate wrote the file (so custom models such
//! as the shapes world's tiny-sd round-trip). Single files carry no tokenizer: SD families use
//! OpenAI CLIP's vocabulary (assets/clip), loragate-written files embed theirs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Family;
use crate::model::ldm::unet_module_to_ldm;
use crate::model::params::{Params, WeightStore};
use crate::model::scheduler::ScheduleConfig;
use crate::model::text_encoder::{TextConfig, TextEncoder};
use crate::model::tokenizer::Tokenizer;
use crate::model::unet::{UNet, UNetConfig};
use crate::model::vae::{Vae, VaeConfig};
use crate::tensors::TensorFile;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const TE_SD1: &str = "cond_stage_model.transformer.";
const TE_SD2: &str = "cond_stage_model.model.";
const TE_XL1: &str = "conditioner.embedders.0.transformer.";
const TE_XL2: &str = "conditioner.embedders.1.model.";

/// Configs written into a loragate-made single file's header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddedConfigs {
    pub unet: serde_json::Value,
    pub vae: serde_json::Value,
    pub text_encoder: serde_json::Value,
    pub scheduler: serde_json::Value,
    /// The tokenizer.json text.
    pub tokenizer: String,
    /// Every config and tokenizer file of the folder it was made from, by relative path, as
    /// text: a folder written back from the file has them byte for byte.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

/// Where a single file's configs came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// The `loragate.configs` header of a file loragate wrote.
    Embedded,
    /// `--config FOLDER`: a diffusers folder's configs and tokenizer.
    Folder(std::path::PathBuf),
    /// `--config FILE.yaml`: an LDM original config's architecture numbers.
    OriginalConfig(std::path::PathBuf),
    /// The published architecture of the family the keys and shapes show.
    Family(Family),
}

/// How to write a converted model's tokenizer(s) into a diffusers folder.
#[derive(Debug, Clone)]
pub enum TokenizerFiles {
    /// Copy these files (relative path → text).
    Files(BTreeMap<String, String>),
    /// OpenAI CLIP's vocabulary (vocab.json + merges.txt), as single files of SD families use.
    Clip,
}

/// A single file converted to the diffusers layout: what [`crate::model::Pipeline`] loads.
pub struct Converted {
    pub family: Family,
    pub unet_config: UNetConfig,
    pub unet: HashMap<String, Tensor>,
    pub vae_config: VaeConfig,
    pub vae: HashMap<String, Tensor>,
    pub text_config: TextConfig,
    pub text_encoder: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub second: Option<(TextConfig, HashMap<String, Tensor>, Tokenizer)>,
    pub schedule: ScheduleConfig,
    pub force_zeros_for_empty_prompt: bool,
    pub source: ConfigSource,
    /// Tensors of the file that no component uses (known buffers aside).
    pub unused: Vec<String>,
    /// The config files to write when converting to a folder (relative path → text).
    pub config_files: BTreeMap<String, String>,
    pub tokenizer_files: TokenizerFiles,
}

/// Tensor name → shape.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// Names and shapes of a safetensors file, from its header alone.
pub fn read_header(path: &Path) -> Result<(Shapes, BTreeMap<String, String>)> {
    use std::io::Read;
    let bad = |m: String| Error::TensorFile { path: path.to_path_buf(), reason: m };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| bad("shorter than a safetensors header".into()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(bad(format!("header of {n} bytes is implausibly large")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|_| bad("truncated header".into()))?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut shapes = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (k, info) in v.as_object().ok_or_else(|| bad("header is not a JSON object".into()))? {
        if k == "__metadata__" {
            if let Some(m) = info.as_object() {
                for (mk, mv) in m {
                    meta.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let shape: Vec<usize> = info["shape"].as_array().map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect()).unwrap_or_default();
        shapes.insert(k.clone(), shape);
    }
    Ok((shapes, meta))
}

/// Which family a single file is, from its keys and shapes.
pub fn detect_family(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Family> {
    let has = |k: &str| shapes.contains_key(k);
    if !shapes.keys().any(|k| k.starts_with(UNET)) {
        return Err(Error::invalid("no `model.diffusion_model.*` tensors: not a Stable Diffusion single-file checkpoint"));
    }
    if has(&format!("{TE_XL2}transformer.resblocks.0.attn.in_proj_weight")) || shapes.keys().any(|k| k.starts_with("conditioner.embedders.")) {
        return Ok(Family::Sdxl);
    }
    if has(&format!("{TE_SD2}transformer.resblocks.0.attn.in_proj_weight")) {
        return Ok(Family::Sd2);
    }
    // SD 1.x layout: the cross-attention key width is the text width.
    let width = shapes
        .iter()
        .find(|(k, _)| k.starts_with(UNET) && k.ends_with("attn2.to_k.weight"))
        .and_then(|(_, s)| s.get(1).copied())
        .ok_or_else(|| Error::invalid("no cross-attention layers found in the UNet"))?;
    Ok(Family::from_text_width(width))
}

fn value<T: for<'de> Deserialize<'de>>(v: &serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| Error::invalid(format!("embedded {what} config: {e}")))
}

/// The diffusers parameter names and shapes an architecture needs, without allocating it.
pub fn unet_parameters(config: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let store = WeightStore::recorder(&Device::Cpu);
    let targets = Default::default();
    UNet::load(&Params::root(&store, &targets), config)?;
    Ok(store.recorded())
}

pub fn vae_parameters(config: &VaeConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let store = WeightStore::recorder(&Device::Cpu);
    let targets = Default::default();
    Vae::load(&Params::root(&store, &targets), config)?;
    Ok(store.recorded())
}

pub fn text_parameters(config: &TextConfig, projection: bool) -> Result<Vec<(String, Vec<usize>)>> {
    let store = WeightStore::recorder(&Device::Cpu);
    let targets = Default::default();
    TextEncoder::load(&Params::root(&store, &targets), config, projection)?;
    Ok(store.recorded())
}

/// diffusers UNet key → LDM key (`model.diffusion_model.` not included).
pub fn unet_key_map(config: &UNetConfig) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (key, _) in unet_parameters(config)? {
        let (module, leaf) = key.rsplit_once('.').expect("parameter keys have a leaf");
        let ldm = unet_module_to_ldm(module, config)
            .ok_or_else(|| Error::invalid(format!("no LDM name for UNet module `{module}`")))?;
        out.push((key.clone(), format!("{ldm}.{leaf}")));
    }
    Ok(out)
}

/// diffusers VAE key → LDM key (`first_stage_model.` not included).
pub fn vae_ldm_key(key: &str, config: &VaeConfig) -> Option<String> {
    let n = config.block_out_channels.len();
    let parts: Vec<&str> = key.split('.').collect();
    let resnet_leaf = |s: &str| if s == "conv_shortcut" { "nin_shortcut".to_string() } else { s.to_string() };
    let join = |head: String, from: usize| -> String {
        let mut v = vec![head];
        v.extend(parts[from..].iter().map(|s| s.to_string()));
        v.join(".")
    };
    let side = *parts.first()?;
    match (side, *parts.get(1)?) {
        ("quant_conv", _) | ("post_quant_conv", _) => Some(key.to_string()),
        (s @ ("encoder" | "decoder"), "conv_in" | "conv_out") => Some(format!("{s}.{}", parts[1..].join("."))),
        (s @ ("encoder" | "decoder"), "conv_norm_out") => Some(join(format!("{s}.norm_out"), 2)),
        (s @ ("encoder" | "decoder"), "mid_block") => match (*parts.get(2)?, *parts.get(3)?) {
            ("resnets", i) => {
                let b = if i == "0" { "block_1" } else { "block_2" };
                Some(format!("{s}.mid.{b}.{}", parts[4..].join(".")))
            }
            ("attentions", "0") => {
                let leaf = match *parts.get(4)? {
                    "group_norm" => "norm",
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    "to_out" => "proj_out",
                    _ => return None,
                };
                let last = parts.last()?;
                Some(format!("{s}.mid.attn_1.{leaf}.{last}"))
            }
            _ => None,
        },
        ("encoder", "down_blocks") => {
            let i = parts.get(2)?;
            match *parts.get(3)? {
                "resnets" => Some(format!("encoder.down.{i}.block.{}.{}.{}", parts.get(4)?, resnet_leaf(parts.get(5)?), parts.get(6)?)),
                "downsamplers" => Some(format!("encoder.down.{i}.downsample.conv.{}", parts.last()?)),
                _ => None,
            }
        }
        ("decoder", "up_blocks") => {
            let i: usize = parts.get(2)?.parse().ok()?;
            let k = n - 1 - i;
            match *parts.get(3)? {
                "resnets" => Some(format!("decoder.up.{k}.block.{}.{}.{}", parts.get(4)?, resnet_leaf(parts.get(5)?), parts.get(6)?)),
                "upsamplers" => Some(format!("decoder.up.{k}.upsample.conv.{}", parts.last()?)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Renames the tensors under `prefix` with `map` (diffusers → LDM), returning diffusers keys.
fn take_mapped(
    all: &mut HashMap<String, Tensor>,
    prefix: &str,
    map: impl Iterator<Item = (String, String)>,
    what: &str,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (diffusers, ldm) in map {
        let key = format!("{prefix}{ldm}");
        let t = all
            .remove(&key)
            .ok_or_else(|| Error::model(path, format!("{what}: missing `{key}` (for `{diffusers}`)")))?;
        out.insert(diffusers, t);
    }
    Ok(out)
}

/// OpenCLIP text tower → transformers CLIPTextModel(WithProjection) keys.
fn openclip_text(all: &mut HashMap<String, Tensor>, prefix: &str, layers: usize, path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut take = |k: &str| -> Result<Tensor> {
        all.remove(&format!("{prefix}{k}")).ok_or_else(|| Error::model(path, format!("missing `{prefix}{k}`")))
    };
    let mut out = HashMap::new();
    out.insert("text_model.embeddings.token_embedding.weight".into(), take("token_embedding.weight")?);
    out.insert("text_model.embeddings.position_embedding.weight".into(), take("positional_embedding")?);
    for i in 0..layers {
        let r = format!("transformer.resblocks.{i}.");
        let l = format!("text_model.encoder.layers.{i}.");
        let w = take(&format!("{r}attn.in_proj_weight"))?;
        let b = take(&format!("{r}attn.in_proj_bias"))?;
        let d = w.dim(1)?;
        for (j, n) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.insert(format!("{l}self_attn.{n}.weight"), w.narrow(0, j * d, d)?.contiguous()?);
            out.insert(format!("{l}self_attn.{n}.bias"), b.narrow(0, j * d, d)?.contiguous()?);
        }
        for (src, dst) in [
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ] {
            for leaf in ["weight", "bias"] {
                out.insert(format!("{l}{dst}.{leaf}"), take(&format!("{r}{src}.{leaf}"))?);
            }
        }
    }
    for leaf in ["weight", "bias"] {
        out.insert(format!("text_model.final_layer_norm.{leaf}"), take(&format!("ln_final.{leaf}"))?);
    }
    // OpenCLIP projects with `x @ P`; a Linear layer stores P transposed.
    if let Ok(p) = take("text_projection") {
        out.insert("text_projection.weight".into(), p.t()?.contiguous()?);
    }
    Ok(out)
}

fn count_resblocks(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> usize {
    let p = format!("{prefix}transformer.resblocks.");
    shapes
        .keys()
        .filter_map(|k| k.strip_prefix(&p).and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok()))
        .max()
        .map(|m| m + 1)
        .unwrap_or(0)
}

fn strip(all: &mut HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let keys: Vec<String> = all.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
    keys.into_iter().filter_map(|k| all.remove(&k).map(|t| (k[prefix.len()..].to_string(), t))).collect()
}

/// Buffers real single files carry that no diffusers component has: known, so not reported.
fn known_buffer(key: &str) -> bool {
    const SCHEDULE: [&str; 12] = [
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2",
    ];
    SCHEDULE.contains(&key)
        || key.ends_with("position_ids")
        || key.starts_with("model_ema.")
        || key == "logvar"
        || key.ends_with(".logit_scale")
        || key.starts_with("cond_stage_model.model.logit_scale")
}

/// Which family the keys and shapes show, and why, checking that the text encoder's spelling
/// and the UNet's cross-attention width agree.
pub fn detect_family_explained(shapes: &Shapes) -> Result<(Family, String)> {
    let family = detect_family(shapes)?;
    let width = shapes.iter().find(|(k, _)| k.starts_with(UNET) && k.ends_with("attn2.to_k.weight")).and_then(|(_, s)| s.get(1).copied());
    let spelled = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    let (te_family, te_why) = if spelled("conditioner.embedders.") {
        (Some(Family::Sdxl), "its text encoders are spelled like SDXL's (`conditioner.embedders.*`)")
    } else if spelled(TE_SD2) {
        (Some(Family::Sd2), "its text encoder is spelled like SD 2.x's (OpenCLIP, `cond_stage_model.model.*`)")
    } else if spelled(TE_SD1) {
        (None, "its text encoder is spelled like SD 1.x's (`cond_stage_model.transformer.*`)")
    } else {
        (None, "it has no text encoder")
    };
    let unet_family = width.map(Family::from_text_width);
    if let (Some(te), Some(u)) = (te_family, unet_family)
        && te != u
        && !(te == Family::Sdxl && width == Some(2048))
    {
        return Err(Error::invalid(format!(
            "{te_why}, but its UNet is {} shaped (cross-attention width {}): a checkpoint mixed from two families",
            describe(u),
            width.unwrap_or(0)
        )));
    }
    let why = match width {
        Some(w) => format!("{te_why} and its UNet's cross-attention width is {w}"),
        None => te_why.to_string(),
    };
    Ok((family, why))
}

fn describe(f: Family) -> String {
    match f {
        Family::Sd1 => "SD 1.x".into(),
        Family::Sd2 => "SD 2.x".into(),
        Family::Sdxl => "SDXL".into(),
        Family::Other { text_width } => format!("text-width-{text_width}"),
    }
}

/// The configs (and tokenizers) a single file is read with, and where they came from.
struct Configs {
    source: ConfigSource,
    unet: UNetConfig,
    vae: VaeConfig,
    text: TextConfig,
    second: Option<TextConfig>,
    schedule: ScheduleConfig,
    tokenizer: Tokenizer,
    tokenizer_2: Option<Tokenizer>,
    force_zeros: bool,
    files: BTreeMap<String, String>,
    tokenizer_files: TokenizerFiles,
}

fn json_text<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("serialisable") + "\n"
}

/// The config and tokenizer files of a diffusers folder, relative to it.
pub fn config_file_names(folder: &Path) -> Vec<String> {
    folder_text_files(folder).map(|f| f.into_keys().collect()).unwrap_or_default()
}

/// Text files of a folder worth carrying: configs, scheduler, tokenizers, model_index.json.
fn folder_text_files(folder: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut add = |rel: &str| -> Result<()> {
        let p = folder.join(rel);
        if p.is_file() {
            out.insert(rel.to_string(), crate::fsutil::read_text(&p)?);
        }
        Ok(())
    };
    add("model_index.json")?;
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        add(&format!("{comp}/config.json"))?;
    }
    add("scheduler/scheduler_config.json")?;
    for tok in ["tokenizer", "tokenizer_2"] {
        if let Ok(entries) = std::fs::read_dir(folder.join(tok)) {
            let mut names: Vec<String> = entries.flatten().filter(|e| e.path().is_file()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            for n in names {
                add(&format!("{tok}/{n}"))?;
            }
        }
    }
    Ok(out)
}

fn configs_for(path: &Path, shapes: &Shapes, meta: &BTreeMap<String, String>, family: Family, config: Option<&Path>) -> Result<Configs> {
    use crate::model::loading::read_config;
    let clip = Tokenizer::openai_clip;
    let clip2 = || -> Result<Tokenizer> {
        let mut t = clip()?;
        t.pad = 0; // SDXL's second tokenizer pads with "!" (id 0)
        Ok(t)
    };
    let sd2_text = || TextConfig { num_hidden_layers: count_resblocks(shapes, TE_SD2).saturating_sub(1), ..TextConfig::sd2() };
    let xl_second = || TextConfig { num_hidden_layers: count_resblocks(shapes, TE_XL2), ..TextConfig::sdxl_bigg() };
    if let Some(c) = config {
        if c.is_dir() {
            let files = folder_text_files(c)?;
            let index: serde_json::Value = if c.join("model_index.json").is_file() { read_config(&c.join("model_index.json"))? } else { serde_json::Value::Null };
            let sched = c.join("scheduler").join("scheduler_config.json");
            let second = if c.join("text_encoder_2").join("config.json").is_file() { Some(read_config(&c.join("text_encoder_2").join("config.json"))?) } else { None };
            let tokenizer_2 = if second.is_some() { Some(Tokenizer::from_dir(&c.join("tokenizer_2"))?) } else { None };
            return Ok(Configs {
                source: ConfigSource::Folder(c.to_path_buf()),
                unet: read_config(&c.join("unet").join("config.json"))?,
                vae: read_config(&c.join("vae").join("config.json"))?,
                text: read_config(&c.join("text_encoder").join("config.json"))?,
                second,
                schedule: if sched.is_file() { read_config(&sched)? } else { ScheduleConfig::default() },
                tokenizer: Tokenizer::from_dir(&c.join("tokenizer"))?,
                tokenizer_2,
                force_zeros: index["force_zeros_for_empty_prompt"].as_bool().unwrap_or(false),
                tokenizer_files: TokenizerFiles::Files(files.iter().filter(|(k, _)| k.starts_with("tokenizer")).map(|(k, v)| (k.clone(), v.clone())).collect()),
                files,
            });
        }
        let ldm = crate::model::ldm_config::read(c)?;
        use crate::model::ldm_config::TextKind;
        let (text, second) = match ldm.text {
            TextKind::OpenAiClip => (TextConfig::sd15(), None),
            TextKind::OpenClip => (sd2_text(), None),
            TextKind::Sdxl => (TextConfig::sd15(), Some(xl_second())),
            TextKind::Unknown => {
                return Err(Error::model(
                    c,
                    "the original config's text encoder is neither FrozenCLIPEmbedder nor FrozenOpenCLIPEmbedder: give --config a diffusers folder, which carries the text encoder's config and tokenizer",
                ));
            }
        };
        let mut files = BTreeMap::new();
        files.insert("unet/config.json".into(), json_text(&ldm.unet_json));
        files.insert("vae/config.json".into(), json_text(&ldm.vae_json));
        files.insert("text_encoder/config.json".into(), json_text(&text));
        if let Some(s) = &second {
            files.insert("text_encoder_2/config.json".into(), json_text(s));
        }
        files.insert("scheduler/scheduler_config.json".into(), json_text(&ldm.schedule));
        return Ok(Configs {
            source: ConfigSource::OriginalConfig(c.to_path_buf()),
            unet: ldm.unet,
            vae: ldm.vae,
            text,
            tokenizer_2: if second.is_some() { Some(clip2()?) } else { None },
            second,
            schedule: ldm.schedule,
            tokenizer: clip()?,
            force_zeros: ldm.text == TextKind::Sdxl,
            files,
            tokenizer_files: TokenizerFiles::Clip,
        });
    }
    if let Some(raw) = meta.get("loragate.configs") {
        let e: EmbeddedConfigs = serde_json::from_str(raw).map_err(|e| Error::model(path, format!("bad loragate.configs header: {e}")))?;
        let tok_path = std::env::temp_dir().join(format!("loragate-tokenizer-{}.json", std::process::id()));
        crate::fsutil::write_text_atomic(&tok_path, &e.tokenizer)?;
        let tok = Tokenizer::from_tokenizer_json(&tok_path);
        let _ = std::fs::remove_file(&tok_path);
        let mut files = e.files.clone();
        if files.is_empty() {
            files.insert("unet/config.json".into(), json_text(&e.unet));
            files.insert("vae/config.json".into(), json_text(&e.vae));
            files.insert("text_encoder/config.json".into(), json_text(&e.text_encoder));
            files.insert("scheduler/scheduler_config.json".into(), json_text(&e.scheduler));
            files.insert("tokenizer/tokenizer.json".into(), e.tokenizer.clone());
        }
        let index: serde_json::Value = files.get("model_index.json").and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default();
        return Ok(Configs {
            source: ConfigSource::Embedded,
            unet: value(&e.unet, "UNet")?,
            vae: value(&e.vae, "VAE")?,
            text: value(&e.text_encoder, "text encoder")?,
            second: None,
            schedule: value(&e.scheduler, "scheduler")?,
            tokenizer: tok?,
            tokenizer_2: None,
            force_zeros: index["force_zeros_for_empty_prompt"].as_bool().unwrap_or(false),
            tokenizer_files: TokenizerFiles::Files(files.iter().filter(|(k, _)| k.starts_with("tokenizer")).map(|(k, v)| (k.clone(), v.clone())).collect()),
            files,
        });
    }
    let (unet, vae, text, second, schedule) = match family {
        Family::Sd1 => (UNetConfig::sd15(), VaeConfig::sd(), TextConfig::sd15(), None, ScheduleConfig::default()),
        // SD 2.x files do not say whether they are the 768-v or the 512 epsilon model; the
        // 768-v model is the common one (see docs/models.md).
        Family::Sd2 => (UNetConfig::sd2(), VaeConfig::sd(), sd2_text(), None, ScheduleConfig { prediction_type: "v_prediction".into(), ..ScheduleConfig::default() }),
        Family::Sdxl => (UNetConfig::sdxl(), VaeConfig::sdxl(), TextConfig::sd15(), Some(xl_second()), ScheduleConfig::default()),
        Family::Other { text_width } => {
            return Err(Error::model(
                path,
                format!(
                    "an SD-layout checkpoint with text width {text_width} and no embedded configs: loragate knows the architectures of SD 1.x, \
                     2.x and XL; give the configs with --config (a diffusers folder of the same architecture, or an LDM original_config .yaml), \
                     as diffusers' from_single_file(..., config=...) takes them"
                ),
            ));
        }
    };
    let mut files = BTreeMap::new();
    files.insert("unet/config.json".into(), json_text(&unet));
    files.insert("vae/config.json".into(), json_text(&vae));
    files.insert("text_encoder/config.json".into(), json_text(&text));
    if let Some(s) = &second {
        files.insert("text_encoder_2/config.json".into(), json_text(s));
    }
    files.insert("scheduler/scheduler_config.json".into(), json_text(&schedule));
    Ok(Configs {
        source: ConfigSource::Family(family),
        tokenizer_2: if second.is_some() { Some(clip2()?) } else { None },
        force_zeros: family == Family::Sdxl,
        unet,
        vae,
        text,
        second,
        schedule,
        tokenizer: clip()?,
        files,
        tokenizer_files: TokenizerFiles::Clip,
    })
}

/// Checks that every tensor the architecture needs is in the file with the right shape, naming
/// the key as the file spells it (and the diffusers name in brackets).
fn check_shapes(path: &Path, shapes: &Shapes, expected: &[(String, Vec<usize>)], map: &dyn Fn(&str) -> Option<String>, what: &str, why: &str) -> Result<()> {
    let mut problems = Vec::new();
    for (diffusers, want) in expected {
        let Some(file_key) = map(diffusers) else { continue };
        match shapes.get(&file_key) {
            None => problems.push(format!("`{file_key}` [{diffusers}] is missing")),
            Some(got) if got.iter().product::<usize>() != want.iter().product::<usize>() => {
                problems.push(format!("`{file_key}` [{diffusers}] has shape {got:?}, the architecture needs {want:?}"))
            }
            _ => {}
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(5);
    Err(Error::model(
        path,
        format!(
            "the {what} tensors do not fit the architecture the configs describe ({n} problems; {why}): {}{}",
            problems.join("; "),
            if n > 5 { "; ..." } else { "" }
        ),
    ))
}

/// Reads and converts a single-file checkpoint; `config` gives the configs (`--config`).
pub fn convert(path: &Path, dtype: DType, device: &Device, config: Option<&Path>) -> Result<Converted> {
    let (shapes, meta) = read_header(path)?;
    let (family, why) = detect_family_explained(&shapes).map_err(|e| Error::model(path, e.to_string()))?;
    let cfg = configs_for(path, &shapes, &meta, family, config)?;
    let why = match &cfg.source {
        ConfigSource::Family(f) => format!("the keys suggested {}: {why}", describe(*f)),
        ConfigSource::Embedded => "configs from the file's own header".into(),
        ConfigSource::Folder(d) => format!("configs from {}", d.display()),
        ConfigSource::OriginalConfig(y) => format!("configs derived from {}", y.display()),
    };
    let mut unet_config = cfg.unet;
    if let Some(s) = shapes.get(&format!("{UNET}input_blocks.0.0.weight")) {
        // Inpainting and other variants change the UNet's input channels.
        unet_config.in_channels = s.get(1).copied().unwrap_or(unet_config.in_channels);
    }
    let unet_map: HashMap<String, String> = unet_key_map(&unet_config)?.into_iter().collect();
    check_shapes(path, &shapes, &unet_parameters(&unet_config)?, &|d| unet_map.get(d).map(|l| format!("{UNET}{l}")), "UNet", &why)?;
    let vae_config = cfg.vae;
    check_shapes(path, &shapes, &vae_parameters(&vae_config)?, &|d| Some(format!("{VAE}{}", vae_ldm_key(d, &vae_config).unwrap_or_else(|| d.to_string()))), "VAE", &why)?;

    if shapes.keys().any(|k| k.starts_with(TE_SD1)) {
        // The transformers layout under its prefix, with or without `text_model.`.
        let projection = shapes.contains_key(&format!("{TE_SD1}text_projection.weight"));
        let te_map = |d: &str| {
            let with = format!("{TE_SD1}{d}");
            let without = format!("{TE_SD1}{}", d.strip_prefix("text_model.").unwrap_or(d));
            Some(if shapes.contains_key(&with) || !shapes.contains_key(&without) { with } else { without })
        };
        check_shapes(path, &shapes, &text_parameters(&cfg.text, projection)?, &te_map, "text encoder", &why)?;
    }
    let file = TensorFile::load(path, dtype, device).map_err(|e| match e {
        Error::TensorFile { path, reason } => Error::model(path, reason),
        other => other,
    })?;
    let mut all = file.tensors;
    let unet = take_mapped(&mut all, UNET, unet_key_map(&unet_config)?.into_iter(), "UNet", path)?;
    let vae_keys = vae_parameters(&vae_config)?;
    let vae = take_mapped(
        &mut all,
        VAE,
        vae_keys.into_iter().map(|(k, _)| {
            let ldm = vae_ldm_key(&k, &vae_config).unwrap_or_else(|| k.clone());
            (k, ldm)
        }),
        "VAE",
        path,
    )?;
    let text_config = cfg.text;
    let (text_encoder, second) = if shapes.keys().any(|k| k.starts_with(TE_SD2)) {
        (openclip_text(&mut all, TE_SD2, text_config.num_hidden_layers, path)?, None)
    } else if shapes.keys().any(|k| k.starts_with("conditioner.embedders.")) {
        let te1 = strip(&mut all, TE_XL1);
        let cfg2 = cfg.second.clone().unwrap_or_else(|| TextConfig { num_hidden_layers: count_resblocks(&shapes, TE_XL2), ..TextConfig::sdxl_bigg() });
        let te2 = openclip_text(&mut all, TE_XL2, cfg2.num_hidden_layers, path)?;
        let tok2 = match cfg.tokenizer_2.clone() {
            Some(t) => t,
            None => {
                let mut t = Tokenizer::openai_clip()?;
                t.pad = 0;
                t
            }
        };
        (te1, Some((cfg2, te2, tok2)))
    } else {
        (strip(&mut all, TE_SD1), None)
    };
    let mut text_encoder = text_encoder;
    crate::model::loading::normalize_text_encoder_keys(&mut text_encoder);
    let mut unused: Vec<String> = all.keys().filter(|k| !known_buffer(k)).cloned().collect();
    unused.sort();
    Ok(Converted {
        family,
        unet_config,
        unet,
        vae_config,
        vae,
        text_config,
        text_encoder,
        tokenizer: cfg.tokenizer,
        second,
        schedule: cfg.schedule,
        force_zeros_for_empty_prompt: cfg.force_zeros,
        source: cfg.source,
        unused,
        config_files: cfg.files,
        tokenizer_files: cfg.tokenizer_files,
    })
}

/// Writes a diffusers pipeline folder as an A1111-style single file, with its configs and
/// tokenizer in the header (`loragate.configs`) so that any architecture round-trips.
pub fn write_from_folder(folder: &Path, out: &Path) -> Result<()> {
    use crate::model::loading::{load_component_tensors, read_config, weight_files};
    let cpu = Device::Cpu;
    if folder.join("text_encoder_2").is_dir() {
        return Err(Error::model(folder, "converting a folder with two text encoders (SDXL) to a single file is not supported; SD 1.x-layout folders are"));
    }
    // Kept in the folder's own precision, so a folder written back is the same bit for bit.
    let unet_file = weight_files(&folder.join("unet"))?.into_iter().next().ok_or_else(|| Error::model(folder, "unet/ has no weights"))?;
    let save_dtype = if crate::tensors::dominant_dtype(&unet_file)? == DType::F16 { crate::tensors::SaveDtype::F16 } else { crate::tensors::SaveDtype::F32 };
    let read = |p: &Path| -> Result<serde_json::Value> { read_config(p) };
    let unet_json = read(&folder.join("unet/config.json"))?;
    let vae_json = read(&folder.join("vae/config.json"))?;
    let te_json = read(&folder.join("text_encoder/config.json"))?;
    let sched_json = read(&folder.join("scheduler/scheduler_config.json")).unwrap_or(serde_json::json!({}));
    let unet_config: UNetConfig = value(&unet_json, "UNet")?;
    let vae_config: VaeConfig = value(&vae_json, "VAE")?;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let unet = load_component_tensors(&folder.join("unet"), DType::F32, &cpu)?;
    for (d, l) in unet_key_map(&unet_config)? {
        let t = unet.get(&d).ok_or_else(|| Error::model(folder, format!("UNet lacks `{d}`")))?;
        tensors.insert(format!("{UNET}{l}"), t.clone());
    }
    let mut vae = load_component_tensors(&folder.join("vae"), DType::F32, &cpu)?;
    crate::model::vae::normalize_vae_keys(&mut vae);
    for (k, t) in vae {
        let l = vae_ldm_key(&k, &vae_config).ok_or_else(|| Error::model(folder, format!("no LDM name for VAE key `{k}`")))?;
        tensors.insert(format!("{VAE}{l}"), t);
    }
    let mut te = load_component_tensors(&folder.join("text_encoder"), DType::F32, &cpu)?;
    crate::model::loading::normalize_text_encoder_keys(&mut te);
    for (k, t) in te {
        tensors.insert(format!("{TE_SD1}{k}"), t);
    }
    let tokenizer = std::fs::read_to_string(folder.join("tokenizer/tokenizer.json")).map_err(|e| Error::io(folder.join("tokenizer/tokenizer.json"), e))?;
    let files = folder_text_files(folder)?;
    let configs = EmbeddedConfigs { unet: unet_json, vae: vae_json, text_encoder: te_json, scheduler: sched_json, tokenizer, files };
    let mut meta = BTreeMap::new();
    meta.insert("loragate.configs".to_string(), serde_json::to_string(&configs).expect("serialisable"));
    meta.insert("format".to_string(), "pt".to_string());
    crate::tensors::save(out, &tensors, &meta, save_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openclip_attention_splits_into_q_k_v_and_the_projection_transposes() {
        let d = 4;
        let dev = Device::Cpu;
        let mut all = HashMap::new();
        let p = "m.";
        let in_w: Vec<f32> = (0..3 * d * d).map(|i| i as f32).collect();
        all.insert(format!("{p}transformer.resblocks.0.attn.in_proj_weight"), Tensor::from_vec(in_w, (3 * d, d), &dev).unwrap());
        all.insert(format!("{p}transformer.resblocks.0.attn.in_proj_bias"), Tensor::arange(0f32, (3 * d) as f32, &dev).unwrap());
        for name in ["attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"] {
            all.insert(format!("{p}transformer.resblocks.0.{name}.weight"), Tensor::zeros((d, d), DType::F32, &dev).unwrap());
            all.insert(format!("{p}transformer.resblocks.0.{name}.bias"), Tensor::zeros(d, DType::F32, &dev).unwrap());
        }
        all.insert(format!("{p}token_embedding.weight"), Tensor::zeros((10, d), DType::F32, &dev).unwrap());
        all.insert(format!("{p}positional_embedding"), Tensor::zeros((7, d), DType::F32, &dev).unwrap());
        all.insert(format!("{p}ln_final.weight"), Tensor::ones(d, DType::F32, &dev).unwrap());
        all.insert(format!("{p}ln_final.bias"), Tensor::zeros(d, DType::F32, &dev).unwrap());
        let proj = Tensor::from_vec((0..d * 2).map(|i| i as f32).collect::<Vec<_>>(), (d, 2), &dev).unwrap();
        all.insert(format!("{p}text_projection"), proj.clone());
        let out = openclip_text(&mut all, p, 1, Path::new("x")).unwrap();
        let k = out["text_model.encoder.layers.0.self_attn.k_proj.weight"].to_vec2::<f32>().unwrap();
        assert_eq!(k[0][0], (d * d) as f32, "k is the second block of rows");
        let vb = out["text_model.encoder.layers.0.self_attn.v_proj.bias"].to_vec1::<f32>().unwrap();
        assert_eq!(vb[0], (2 * d) as f32);
        assert_eq!(out["text_projection.weight"].dims(), &[2, d]);
        assert_eq!(out["text_projection.weight"].to_vec2::<f32>().unwrap()[1][0], proj.to_vec2::<f32>().unwrap()[0][1]);
        assert!(all.is_empty(), "every OpenCLIP tensor was used: {:?}", all.keys().collect::<Vec<_>>());
    }
}
