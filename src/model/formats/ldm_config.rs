//! An LDM / SGM `original_config` YAML (`v1-inference.yaml`, `v2-inference-v.yaml`,
//! `sd_xl_base.yaml`) → the diffusers configs of the UNet, the VAE and the schedule, derived
//! from its architecture numbers as diffusers' `from_single_file(..., original_config=...)`
//! does: `model_channels × channel_mult` are the block widths, `attention_resolutions` say which
//! levels attend, `num_heads` or `num_head_channels` the heads, `context_dim` the text width.

use std::path::Path;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::scheduler::ScheduleConfig;
use crate::model::unet::UNetConfig;
use crate::model::vae::VaeConfig;

/// What an original config says about the text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKind {
    /// `FrozenCLIPEmbedder`: OpenAI CLIP ViT-L/14 (SD 1.x).
    OpenAiClip,
    /// `FrozenOpenCLIPEmbedder`: OpenCLIP ViT-H (SD 2.x).
    OpenClip,
    /// SGM's `GeneralConditioner` with two encoders (SDXL).
    Sdxl,
    Unknown,
}

/// The configs an original config describes.
#[derive(Debug, Clone)]
pub struct LdmConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub schedule: ScheduleConfig,
    pub text: TextKind,
    /// The JSON the UNet and VAE configs were made from (for writing a diffusers folder).
    pub unet_json: Value,
    pub vae_json: Value,
}

fn err(path: &Path, m: impl Into<String>) -> Error {
    Error::model(path, format!("original config: {}", m.into()))
}

fn num(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize).or_else(|| v.as_f64().filter(|x| x.fract() == 0.0 && *x >= 0.0).map(|x| x as usize))
}

fn list(v: &Value) -> Option<Vec<usize>> {
    v.as_array()?.iter().map(num).collect()
}

/// Reads and converts an original config file.
pub fn read(path: &Path) -> Result<LdmConfigs> {
    let text = crate::fsutil::read_text(path)?;
    let v: Value = serde_saphyr::from_str(&text).map_err(|e| {
        let (line, column, message) = crate::error::yaml_error_parts(&e);
        err(path, format!("{line}:{column}: {message}"))
    })?;
    from_value(path, &v)
}

/// Converts a parsed original config.
pub fn from_value(path: &Path, v: &Value) -> Result<LdmConfigs> {
    let params = &v["model"]["params"];
    if params.is_null() {
        return Err(err(path, "no `model.params`: not an LDM/SGM original config"));
    }
    let (unet_params, sgm) = if params["unet_config"]["params"].is_object() {
        (&params["unet_config"]["params"], false)
    } else if params["network_config"]["params"].is_object() {
        (&params["network_config"]["params"], true)
    } else {
        return Err(err(path, "neither `model.params.unet_config` nor `model.params.network_config`"));
    };
    let need = |k: &str| num(&unet_params[k]).ok_or_else(|| err(path, format!("the UNet's `{k}` is missing or not a number")));
    let model_channels = need("model_channels")?;
    let mult = list(&unet_params["channel_mult"]).ok_or_else(|| err(path, "the UNet's `channel_mult` is missing"))?;
    let widths: Vec<usize> = mult.iter().map(|m| m * model_channels).collect();
    let levels = widths.len();
    let layers = num(&unet_params["num_res_blocks"]).ok_or_else(|| err(path, "the UNet's `num_res_blocks` must be one number"))?;
    let context_dim = need("context_dim")?;
    // Which levels attend: attention_resolutions lists downsampling factors (1, 2, 4, ...);
    // SGM files may instead set a transformer depth of 0 for a level.
    let attn_res: Vec<usize> = list(&unet_params["attention_resolutions"]).unwrap_or_default();
    let depth: Vec<usize> = match &unet_params["transformer_depth"] {
        Value::Null => vec![1; levels],
        d => match num(d) {
            Some(n) => vec![n; levels],
            None => list(d).ok_or_else(|| err(path, "`transformer_depth` must be a number or a list"))?,
        },
    };
    if depth.len() != levels {
        return Err(err(path, format!("`transformer_depth` has {} entries for {levels} levels", depth.len())));
    }
    let attends: Vec<bool> = (0..levels).map(|i| attn_res.contains(&(1 << i)) && depth[i] > 0).collect();
    let down: Vec<&str> = attends.iter().map(|a| if *a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> = attends.iter().rev().map(|a| if *a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let heads: Value = match (num(&unet_params["num_heads"]).filter(|h| *h > 0), num(&unet_params["num_head_channels"]).filter(|c| *c > 0)) {
        // A channel count per head: diffusers' "attention_head_dim" is then the heads per level.
        (_, Some(ch)) => json!(widths.iter().map(|w| w / ch).collect::<Vec<_>>()),
        (Some(h), None) => json!(h),
        (None, None) => return Err(err(path, "the UNet has neither `num_heads` nor `num_head_channels`")),
    };
    let mut unet = json!({
        "in_channels": num(&unet_params["in_channels"]).unwrap_or(4),
        "out_channels": num(&unet_params["out_channels"]).unwrap_or(4),
        "block_out_channels": widths,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers,
        "attention_head_dim": heads,
        "cross_attention_dim": context_dim,
        "transformer_layers_per_block": depth.iter().copied().map(|d| d.max(1)).collect::<Vec<_>>(),
        "use_linear_projection": unet_params["use_linear_in_transformer"].as_bool().unwrap_or(false),
    });
    if let Some(s) = num(&unet_params["image_size"]) {
        unet["sample_size"] = json!(s);
    }
    if let Some(adm) = num(&unet_params["adm_in_channels"]) {
        // SDXL's pooled text embedding and six size numbers, 256 features each.
        unet["addition_embed_type"] = json!("text_time");
        unet["addition_time_embed_dim"] = json!(256);
        unet["projection_class_embeddings_input_dim"] = json!(adm);
    }
    let unet_config: UNetConfig = serde_json::from_value(unet.clone()).map_err(|e| err(path, format!("UNet: {e}")))?;
    unet_config.validate().map_err(|e| err(path, e.to_string()))?;

    let vae_params = &params["first_stage_config"]["params"]["ddconfig"];
    let vneed = |k: &str| num(&vae_params[k]).ok_or_else(|| err(path, format!("the VAE's `ddconfig.{k}` is missing")));
    let ch = vneed("ch")?;
    let vmult = list(&vae_params["ch_mult"]).ok_or_else(|| err(path, "the VAE's `ddconfig.ch_mult` is missing"))?;
    let scale = params["scale_factor"].as_f64().unwrap_or(0.18215);
    let mut vae = json!({
        "in_channels": num(&vae_params["in_channels"]).unwrap_or(3),
        "out_channels": num(&vae_params["out_ch"]).unwrap_or(3),
        "block_out_channels": vmult.iter().map(|m| m * ch).collect::<Vec<_>>(),
        "down_block_types": vec!["DownEncoderBlock2D"; vmult.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; vmult.len()],
        "layers_per_block": vneed("num_res_blocks")?,
        "latent_channels": vneed("z_channels")?,
        "scaling_factor": scale,
    });
    if let Some(r) = num(&vae_params["resolution"]) {
        vae["sample_size"] = json!(r);
    }
    let vae_config: VaeConfig = serde_json::from_value(vae.clone()).map_err(|e| err(path, format!("VAE: {e}")))?;

    let mut schedule = ScheduleConfig::default();
    if let Some(x) = params["linear_start"].as_f64() {
        schedule.beta_start = x;
    }
    if let Some(x) = params["linear_end"].as_f64() {
        schedule.beta_end = x;
    }
    if let Some(t) = num(&params["timesteps"]) {
        schedule.num_train_timesteps = t;
    }
    if params["parameterization"].as_str() == Some("v") {
        schedule.prediction_type = "v_prediction".into();
    }
    let target = |v: &Value| v["target"].as_str().unwrap_or("").to_string();
    let text = if sgm {
        TextKind::Sdxl
    } else {
        let t = target(&params["cond_stage_config"]);
        if t.ends_with("FrozenOpenCLIPEmbedder") {
            TextKind::OpenClip
        } else if t.ends_with("FrozenCLIPEmbedder") {
            TextKind::OpenAiClip
        } else {
            TextKind::Unknown
        }
    };
    Ok(LdmConfigs { unet: unet_config, vae: vae_config, schedule, text, unet_json: unet, vae_json: vae })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::unet::PerBlock;

    /// The numbers of `v1-inference.yaml` (the published SD 1.x original config).
    const SD1: &str = "model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
";

    fn yaml(s: &str) -> Value {
        serde_saphyr::from_str(s).unwrap()
    }

    #[test]
    fn sd1_original_config_gives_sd15s_architecture() {
        let c = from_value(Path::new("v1-inference.yaml"), &yaml(SD1)).unwrap();
        let want = UNetConfig::sd15();
        assert_eq!(c.unet.block_out_channels, want.block_out_channels);
        assert_eq!(c.unet.down_block_types, want.down_block_types);
        assert_eq!(c.unet.up_block_types, want.up_block_types);
        assert_eq!(c.unet.attention_head_dim, PerBlock::One(8));
        assert_eq!(c.unet.cross_attention_dim, PerBlock::One(768));
        assert_eq!(c.vae.block_out_channels, VaeConfig::sd().block_out_channels);
        assert_eq!(c.vae.scaling_factor, 0.18215);
        assert_eq!(c.text, TextKind::OpenAiClip);
        assert_eq!(c.schedule.beta_end, 0.012);
    }

    #[test]
    fn sd2_heads_come_from_channels_per_head_and_v_prediction_from_the_parameterization() {
        let sd2 = SD1
            .replace("num_heads: 8", "num_head_channels: 64\n        use_linear_in_transformer: True")
            .replace("context_dim: 768", "context_dim: 1024")
            .replace("timesteps: 1000", "timesteps: 1000\n    parameterization: \"v\"")
            .replace("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder");
        let c = from_value(Path::new("v2-inference-v.yaml"), &yaml(&sd2)).unwrap();
        assert_eq!(c.unet.attention_head_dim, PerBlock::Each(vec![5, 10, 20, 20]));
        assert!(c.unet.use_linear_projection);
        assert_eq!(c.schedule.prediction_type, "v_prediction");
        assert_eq!(c.text, TextKind::OpenClip);
    }

    #[test]
    fn sgm_configs_give_sdxls_depths_and_added_conditioning() {
        let xl = "model:
  params:
    scale_factor: 0.13025
    network_config:
      params:
        adm_in_channels: 2816
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
    first_stage_config:
      params:
        ddconfig: { z_channels: 4, resolution: 256, in_channels: 3, out_ch: 3, ch: 128, ch_mult: [1, 2, 4, 4], num_res_blocks: 2 }
";
        let c = from_value(Path::new("sd_xl_base.yaml"), &yaml(xl)).unwrap();
        let want = UNetConfig::sdxl();
        assert_eq!(c.unet.down_block_types, want.down_block_types);
        assert_eq!(c.unet.up_block_types, want.up_block_types);
        assert_eq!(c.unet.attention_head_dim, PerBlock::Each(vec![5, 10, 20]));
        assert_eq!(c.unet.transformer_layers_per_block, PerBlock::Each(vec![1, 2, 10]));
        assert_eq!(c.unet.projection_class_embeddings_input_dim, Some(2816));
        assert_eq!(c.vae.scaling_factor, 0.13025);
        assert_eq!(c.text, TextKind::Sdxl);
    }

    #[test]
    fn broken_configs_say_what_is_missing() {
        let e = from_value(Path::new("x.yaml"), &yaml("model: { params: { unet_config: { params: { model_channels: 64 } } } }")).unwrap_err();
        assert!(e.to_string().contains("channel_mult"), "{e}");
        assert!(from_value(Path::new("x.yaml"), &yaml("a: 1")).unwrap_err().to_string().contains("not an LDM/SGM original config"));
    }
}
