//! Writing trained LoRAs: the tensors through [`crate::lora::export`] (atomic), plus the
//! metadata other tools read — kohya's `ss_*` keys (what A1111/ComfyUI/civitai show), the
//! Stability `modelspec.*` keys, and loragate's own (the resolved training config as JSON and
//! the dataset hash, so a LoRA says exactly what made it).

use std::collections::BTreeMap;
use std::path::Path;

use super::config::{OutputFormat, TrainConfig};
use super::network::Network;
use crate::error::Result;
use crate::lora::export::write;
use crate::lora::keys::KeyStyle;
use crate::model::Family;
use crate::model::scheduler::Prediction;
use crate::tensors::SaveDtype;

/// Facts about a training run that go into every file it writes.
#[derive(Debug, Clone)]
pub struct RunFacts {
    /// The model argument as given (`tiny`, a folder).
    pub model: String,
    pub family: Family,
    pub prediction: Prediction,
    /// Distinct images used.
    pub images: usize,
    /// Images × repeats: kohya's `ss_num_train_images`.
    pub samples_per_epoch: usize,
    pub dataset_hash: String,
    /// Per folder: (repeats, image count), kohya's `ss_dataset_dirs`.
    pub folders: BTreeMap<String, (usize, usize)>,
    /// Tag → count over all captions, kohya's `ss_tag_frequency`.
    pub tag_frequency: BTreeMap<String, BTreeMap<String, usize>>,
    /// Seconds since the Unix epoch when training started.
    pub started_at: u64,
}

/// The `modelspec.architecture` of a LoRA for a family.
pub fn architecture(family: Family, prediction: Prediction) -> String {
    let base = match family {
        Family::Sd1 => "stable-diffusion-v1".to_string(),
        Family::Sd2 if prediction == Prediction::VPrediction => "stable-diffusion-v2-768-v".to_string(),
        Family::Sd2 => "stable-diffusion-v2-512".to_string(),
        Family::Sdxl => "stable-diffusion-xl-v1-base".to_string(),
        // Not loadable by SD 1.x tools even though the layout matches: say what it is.
        Family::Other { text_width } => format!("sd-layout-text{text_width}"),
    };
    format!("{base}/lora")
}

/// `YYYY-MM-DDTHH:MM:SS+00:00` for Unix seconds (modelspec dates are ISO 8601).
pub fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The metadata of a file written after `step` steps.
pub fn metadata(cfg: &TrainConfig, facts: &RunFacts, network: &Network, step: usize) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    let res = cfg.resolutions.iter().copied().max().unwrap_or(0);
    let pred = match facts.prediction {
        Prediction::Epsilon => "epsilon",
        Prediction::VPrediction => "v",
        Prediction::Sample => "sample",
    };
    // kohya sd-scripts' keys, as its train_network.py writes them.
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", network.rank.to_string());
    put("ss_network_alpha", fmt_num(network.alpha));
    put("ss_network_args", serde_json::json!({ "target_modules": cfg.targets }).to_string());
    put("ss_base_model_version", facts.family.id());
    put("ss_sd_model_name", facts.model.clone());
    put("ss_v2", (matches!(facts.family, Family::Sd2)).to_string());
    put("ss_resolution", format!("({res}, {res})"));
    put("ss_learning_rate", fmt_num(cfg.learning_rate));
    put("ss_unet_lr", fmt_num(cfg.learning_rate));
    put("ss_text_encoder_lr", "0".into());
    put("ss_lr_scheduler", cfg.lr_schedule.name().into());
    put("ss_lr_warmup_steps", cfg.warmup_steps.to_string());
    put("ss_optimizer", format!(
        "loragate.AdamW(betas=({}, {}), eps={}, weight_decay={})",
        cfg.adamw.beta1, cfg.adamw.beta2, cfg.adamw.eps, cfg.adamw.weight_decay
    ));
    put("ss_max_grad_norm", fmt_num(cfg.max_grad_norm));
    put("ss_max_train_steps", cfg.steps.to_string());
    put("ss_steps", step.to_string());
    put("ss_epoch", (step * cfg.batch_size / facts.samples_per_epoch.max(1)).to_string());
    put("ss_batch_size_per_device", cfg.batch_size.to_string());
    put("ss_num_train_images", facts.samples_per_epoch.to_string());
    put("ss_num_reg_images", "0".into());
    put("ss_seed", cfg.seed.to_string());
    put("ss_output_name", cfg.name.clone());
    put("ss_training_started_at", facts.started_at.to_string());
    put("ss_keep_tokens", cfg.caption.keep_tokens.to_string());
    put("ss_shuffle_caption", cfg.caption.shuffle.to_string());
    put("ss_caption_tag_dropout_rate", fmt_num(cfg.caption.tag_dropout));
    put("ss_caption_dropout_rate", fmt_num(cfg.caption.caption_dropout));
    put("ss_flip_aug", (cfg.image.flip > 0.0).to_string());
    put("ss_color_aug", (cfg.image.color_jitter > 0.0).to_string());
    put("ss_enable_bucket", "true".into());
    put("ss_bucket_no_upscale", "false".into());
    put("ss_mixed_precision", "no".into());
    put("ss_cache_latents", "true".into());
    put("ss_prediction_type", pred.into());
    let dirs: serde_json::Map<String, serde_json::Value> = facts
        .folders
        .iter()
        .map(|(k, (r, n))| (k.clone(), serde_json::json!({ "n_repeats": r, "img_count": n })))
        .collect();
    put("ss_dataset_dirs", serde_json::Value::Object(dirs).to_string());
    put("ss_tag_frequency", serde_json::to_string(&facts.tag_frequency).unwrap_or_default());
    // Stability's model spec (https://github.com/Stability-AI/ModelSpec).
    put("modelspec.sai_model_spec", "1.0.0".into());
    put("modelspec.architecture", architecture(facts.family, facts.prediction));
    put(
        "modelspec.implementation",
        match cfg.format {
            OutputFormat::Kohya => "https://github.com/kohya-ss/sd-scripts".into(),
            OutputFormat::Diffusers => "diffusers".into(),
        },
    );
    put("modelspec.title", cfg.name.clone());
    put("modelspec.resolution", format!("{res}x{res}"));
    put("modelspec.date", iso8601(facts.started_at));
    put("modelspec.prediction_type", pred.into());
    put("modelspec.description", format!("LoRA trained by loragate on {} for {step} of {} steps", facts.model, cfg.steps));
    // loragate's own.
    put("loragate.version", env!("CARGO_PKG_VERSION").into());
    put("loragate.training_config", cfg.to_json());
    put("loragate.dataset_hash", facts.dataset_hash.clone());
    put("loragate.step", step.to_string());
    if cfg.format == OutputFormat::Diffusers {
        // What diffusers ≥ 0.33 reads for alpha when it loads its own format.
        let targets: Vec<String> = network.modules.iter().map(|mm| mm.path().to_string()).collect();
        put(
            "lora_adapter_metadata",
            serde_json::json!({ "unet.r": network.rank, "unet.lora_alpha": network.alpha, "unet.target_modules": targets })
                .to_string(),
        );
    }
    m
}

fn fmt_num(v: f64) -> String {
    // Short and exact for values like 1e-4 (Display gives "0.0001").
    format!("{v}")
}

/// Writes `network` to `path` atomically in the configured format and precision.
pub fn save(path: &Path, cfg: &TrainConfig, network: &Network, metadata: &BTreeMap<String, String>) -> Result<()> {
    let style = match cfg.format {
        OutputFormat::Kohya => KeyStyle::Kohya,
        OutputFormat::Diffusers => KeyStyle::Diffusers,
    };
    let dtype = if cfg.save_precision == "f16" { SaveDtype::F16 } else { SaveDtype::F32 };
    write(path, &network.export_modules()?, style, metadata, dtype)
}

/// Adds the held-out loss of a checkpoint to its metadata: the mean MSE of `samples` held-out
/// samples at fixed timesteps and noise (see [`super::r#loop::HELDOUT_TIMESTEPS`]).
pub fn put_heldout(m: &mut BTreeMap<String, String>, loss: f64, samples: usize) {
    m.insert("loragate.heldout_loss".into(), format!("{loss:.6}"));
    m.insert("loragate.heldout_samples".into(), samples.to_string());
    let ts: Vec<String> = super::r#loop::HELDOUT_TIMESTEPS.iter().map(|t| t.to_string()).collect();
    m.insert("loragate.heldout_timesteps".into(), format!("[{}]", ts.join(", ")));
}

/// Copies the safetensors file `src` to `dst` (atomically) with `extra` added to its
/// `__metadata__`. The tensor bytes are copied unchanged: their offsets are relative to the end
/// of the header, which is rewritten (padded to 8 bytes, as the format asks).
pub fn copy_with_metadata(src: &Path, dst: &Path, extra: &BTreeMap<String, String>) -> Result<()> {
    use crate::error::{Error, IoContext};
    let bytes = std::fs::read(src).at(src)?;
    let bad = |why: &str| Error::invalid(format!("{}: not a safetensors file ({why})", src.display()));
    let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("shorter than its header size"))?.try_into().map_err(|_| bad("header size"))?) as usize;
    let header = bytes.get(8..8usize.saturating_add(n)).ok_or_else(|| bad("header past the end"))?;
    let mut json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let meta = json.entry("__metadata__").or_insert_with(|| serde_json::Value::Object(Default::default()));
    let Some(meta) = meta.as_object_mut() else { return Err(bad("__metadata__ is not an object")) };
    for (k, v) in extra {
        meta.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let mut head = serde_json::to_vec(&json).map_err(|e| bad(&e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    crate::fsutil::write_atomic(dst, &out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_iso8601() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00+00:00");
        assert_eq!(iso8601(1_767_225_599), "2025-12-31T23:59:59+00:00");
    }

    #[test]
    fn architectures_name_the_family() {
        assert_eq!(architecture(Family::Sd1, Prediction::Epsilon), "stable-diffusion-v1/lora");
        assert_eq!(architecture(Family::Sdxl, Prediction::Epsilon), "stable-diffusion-xl-v1-base/lora");
        assert_eq!(architecture(Family::Other { text_width: 192 }, Prediction::Epsilon), "sd-layout-text192/lora");
    }
}
