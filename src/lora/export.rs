//! Writing LoRAs in the formats other tools read.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;

use super::keys::{Component, KeyStyle, Role, format_key};
use crate::error::Result;
use crate::tensors::{SaveDtype, save};

/// One module to write, with a dotted path inside its component.
#[derive(Debug, Clone)]
pub struct ExportModule {
    pub component: Component,
    pub path: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

/// The key → tensor map of `modules` in `style`. kohya and diffusers files carry `alpha`
/// tensors; PEFT files keep alpha in `adapter_config.json` (see [`peft_adapter_config`]).
pub fn to_tensors(modules: &[ExportModule], style: KeyStyle) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for m in modules {
        out.insert(format_key(style, m.component, &m.path, Role::Down), m.down.clone());
        out.insert(format_key(style, m.component, &m.path, Role::Up), m.up.clone());
        if style != KeyStyle::Peft {
            let alpha = Tensor::new(&[m.alpha as f32], m.down.device())?.reshape(())?;
            out.insert(format_key(style, m.component, &m.path, Role::Alpha), alpha);
        }
    }
    Ok(out)
}

/// Writes a LoRA file atomically.
pub fn write(
    path: &Path,
    modules: &[ExportModule],
    style: KeyStyle,
    metadata: &BTreeMap<String, String>,
    dtype: SaveDtype,
) -> Result<()> {
    save(path, &to_tensors(modules, style)?, metadata, dtype)
}

/// A PEFT `adapter_config.json` for modules of one rank and alpha.
pub fn peft_adapter_config(rank: usize, alpha: f64, target_modules: &[String]) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": true,
    })
}
