//! What produced an image: the facts written into PNG text chunks, baseline metadata and cache
//! keys, so an image can always be traced back and regenerated.

use serde::{Deserialize, Serialize};

/// One LoRA as used for a generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraUse {
    pub name: String,
    pub hash: String,
    pub weight: f64,
}

/// Everything that determines a generated image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: String,
    pub width: usize,
    pub height: usize,
    pub clip_skip: usize,
    pub model: String,
    pub model_hash: String,
    pub loras: Vec<LoraUse>,
    pub device: String,
    pub dtype: String,
    pub loragate: String,
    /// The generator version ([`crate::harness::cache::GENERATOR_VERSION`]): the code that
    /// made the pixels.
    #[serde(default)]
    pub generator: String,
}

impl GenerationRecord {
    /// A1111's `parameters` text, which image viewers and UIs of the ecosystem read.
    pub fn a1111_parameters(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.loras.is_empty() {
            for l in &self.loras {
                s.push_str(&format!(" <lora:{}:{}>", l.name.trim_end_matches(".safetensors"), l.weight));
            }
        }
        s.push('\n');
        if !self.negative_prompt.is_empty() {
            s.push_str(&format!("Negative prompt: {}\n", self.negative_prompt));
        }
        s.push_str(&format!(
            "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            self.steps,
            self.sampler.to_uppercase(),
            self.guidance,
            self.seed,
            self.width,
            self.height,
            &self.model_hash[..self.model_hash.len().min(10)],
            self.model
        ));
        if self.clip_skip > 1 {
            s.push_str(&format!(", Clip skip: {}", self.clip_skip));
        }
        if !self.loras.is_empty() {
            let hashes: Vec<String> =
                self.loras.iter().map(|l| format!("{}: {}", l.name, &l.hash[..l.hash.len().min(12)])).collect();
            s.push_str(&format!(", Lora hashes: \"{}\"", hashes.join(", ")));
        }
        s.push_str(&format!(", Version: loragate {}", self.loragate));
        s
    }

    /// The PNG text chunks for this record.
    pub fn png_text(&self) -> Vec<(String, String)> {
        vec![
            ("parameters".to_string(), self.a1111_parameters()),
            ("loragate".to_string(), serde_json::to_string(self).expect("serialisable")),
        ]
    }
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
