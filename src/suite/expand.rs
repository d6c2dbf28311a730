//! Cases → concrete generations.
//!
//! Each case expands into variants (the prompt as written, each tag order, each ladder rung,
//! each base model, each sweep weight, each bisection prefix, each LoRA and pair of a stack);
//! each variant into one image per seed, plus the same seeds without LoRAs as the automatic
//! control. Identical generations are planned once, whichever cases ask for them.

use std::collections::HashMap;

use super::{AdapterUse, ModelRef, Suite, Variant};
use crate::error::Result;
use crate::model::GenerationParams;
use crate::model::pipeline::native_size;
use crate::names::SafeName;

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub model: ModelRef,
    /// Suite LoRA indices and weights, in stack order (empty: the base model).
    pub stack: Vec<AdapterUse>,
    pub prompt: String,
    pub seed: u64,
    pub params: GenerationParams,
}

impl Job {
    /// A structural identity for de-duplication within a plan: everything that changes pixels,
    /// the model by every part of its location (a single file and its folder are different
    /// models from the folder alone).
    fn dedup_key(&self) -> String {
        let stack: Vec<String> = self.stack.iter().map(|a| format!("{}@{}", a.lora, a.weight)).collect();
        let p = &self.params;
        let loc = &self.model.location;
        serde_json::json!({
            "folder": loc.folder,
            "unet": loc.unet_folder,
            "single_file": loc.single_file,
            "config": loc.config,
            "stack": stack,
            "prompt": self.prompt,
            "negative": p.negative_prompt,
            "size": [p.width, p.height],
            "steps": p.steps,
            "guidance": p.guidance,
            "sampler": p.sampler.name(),
            "clip_skip": p.clip_skip,
            "seed": self.seed,
        })
        .to_string()
    }
}

/// A variant of a case, with the jobs of its images.
#[derive(Debug, Clone)]
pub struct VariantPlan {
    /// `main`, `order-2`, `192x192`, `tiny-sticker`, `w0.5`, `+2`, `zorb+sticker`.
    pub label: SafeName,
    pub model: ModelRef,
    pub prompt: String,
    pub score_text: String,
    pub stack: Vec<AdapterUse>,
    pub params: GenerationParams,
    /// CLIP floor for this variant (raw cosine).
    pub floor: f64,
    /// Sweep weight of the swept LoRA.
    pub weight: Option<f64>,
    /// Bisection: the word added last (None for the base prompt).
    pub added: Option<String>,
    pub seeds: Vec<u64>,
    /// Job index per seed.
    pub images: Vec<usize>,
    /// Job index per seed of the no-LoRA control (empty when the variant has none).
    pub controls: Vec<usize>,
    /// The slices this variant belongs to (`bg=grass`, `tag=large`, `first=large`,
    /// `size=192x192`, `model=tiny-sticker`): its measurements are grouped by them.
    pub slices: Vec<String>,
}

impl VariantPlan {
    /// `<variant>-s<seed>`: the image's file name in baselines and reports.
    pub fn image_id(&self, seed: u64) -> SafeName {
        SafeName::slug(&format!("{}-s{seed}", self.label))
    }
}

#[derive(Debug, Clone)]
pub struct CasePlan {
    pub case: usize,
    pub variants: Vec<VariantPlan>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub cases: Vec<CasePlan>,
    pub jobs: Vec<Job>,
}

struct JobTable {
    jobs: Vec<Job>,
    index: HashMap<String, usize>,
}

impl JobTable {
    fn add(&mut self, job: Job) -> usize {
        let key = job.dedup_key();
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.jobs.push(job);
        self.index.insert(key, self.jobs.len() - 1);
        self.jobs.len() - 1
    }
}

/// A variant before it becomes jobs.
struct VariantSpec {
    label: String,
    model: ModelRef,
    prompt: String,
    stack: Vec<AdapterUse>,
    size: (usize, usize),
    floor: f64,
    weight: Option<f64>,
    added: Option<String>,
    control: bool,
    /// A prompt set's per-prompt settings (kohya's `--n --d --l --s --ss`).
    overrides: Option<super::prompts::PromptEntry>,
    slices: Vec<String>,
}

/// `tag=<tag>` for each comma-separated tag of `prompt`, trigger words removed (a tag that is
/// only a trigger names no slice).
pub fn tag_slices(prompt: &str, triggers: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for tag in prompt.split(',') {
        let words: Vec<String> = tag.split_whitespace().map(|w| w.to_lowercase()).filter(|w| !triggers.iter().any(|t| t.eq_ignore_ascii_case(w))).collect();
        let key = format!("tag={}", words.join(" "));
        if !words.is_empty() && !out.contains(&key) {
            out.push(key);
        }
    }
    out
}

/// The tag a prompt names first (`first=<tag>`), for slicing tag orders.
fn first_tag(prompt: &str) -> Vec<String> {
    let first = prompt.split(',').map(|t| t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()).find(|t| !t.is_empty());
    first.map(|t| vec![format!("first={t}")]).unwrap_or_default()
}

/// Expands every case of `suite`.
pub fn expand(suite: &Suite) -> Result<Plan> {
    let mut table = JobTable { jobs: Vec::new(), index: HashMap::new() };
    let mut native: HashMap<ModelRef, (usize, usize)> = HashMap::new();
    let mut cases = Vec::with_capacity(suite.cases.len());
    for (ci, case) in suite.cases.iter().enumerate() {
        let s = &case.settings;
        let mut size_of = |m: &ModelRef| -> Result<(usize, usize)> {
            if let Some(sz) = s.size {
                return Ok(sz);
            }
            if let Some(sz) = native.get(m) {
                return Ok(*sz);
            }
            let sz = native_size(&m.location)?;
            native.insert(m.clone(), sz);
            Ok(sz)
        };
        let loras_of = |stack: &[AdapterUse]| stack.iter().map(|a| &suite.loras[a.lora]).collect::<Vec<_>>();
        let score = |prompt: &str| {
            if prompt == case.prompt {
                case.score_text.clone()
            } else {
                super::validate::score_text(prompt, &loras_of(&case.adapters))
            }
        };
        let floor = case.thresholds.clip_floor;
        let first = &case.models[0];
        let triggers: Vec<&str> = case.adapters.iter().filter_map(|a| suite.loras[a.lora].trigger.as_deref()).collect();
        let tags = |prompt: &str| tag_slices(prompt, &triggers);
        // The common shape: the case's prompt and stack on one model.
        let spec = |label: String, model: &ModelRef, size: (usize, usize)| VariantSpec {
            label,
            model: model.clone(),
            prompt: case.prompt.clone(),
            stack: case.adapters.clone(),
            size,
            floor,
            weight: None,
            added: None,
            control: case.control,
            overrides: None,
            slices: Vec::new(),
        };
        let mut specs: Vec<VariantSpec> = Vec::new();
        match &case.variant {
            Variant::Single => {
                for m in &case.models {
                    let label = if case.models.len() > 1 { m.label.to_string() } else { "main".into() };
                    specs.push(VariantSpec { slices: tags(&case.prompt), ..spec(label, m, size_of(m)?) });
                }
            }
            Variant::BaseSwap => {
                for m in &case.models {
                    let mut slices = vec![format!("model={}", m.label)];
                    slices.extend(tags(&case.prompt));
                    specs.push(VariantSpec { slices, ..spec(m.label.to_string(), m, size_of(m)?) });
                }
            }
            Variant::WordOrder { prompts } => {
                for (i, p) in prompts.iter().enumerate() {
                    let mut slices = first_tag(p);
                    slices.extend(tags(p));
                    specs.push(VariantSpec { prompt: p.clone(), slices, ..spec(format!("order-{i}"), first, size_of(first)?) });
                }
            }
            Variant::Ladder { rungs } => {
                for (size, f) in rungs {
                    let mut slices = vec![format!("size={}x{}", size.0, size.1)];
                    slices.extend(tags(&case.prompt));
                    specs.push(VariantSpec { floor: f.unwrap_or(floor), slices, ..spec(format!("{}x{}", size.0, size.1), first, *size) });
                }
            }
            Variant::Sweep { adapter, weights } => {
                for w in weights {
                    let mut stack = case.adapters.clone();
                    stack[*adapter].weight = *w;
                    // The control (no LoRA) doubles as the base render that weight 0 must
                    // reproduce.
                    specs.push(VariantSpec { stack, weight: Some(*w), ..spec(format!("w{w}"), first, size_of(first)?) });
                }
            }
            Variant::Bisect { add } => {
                let mut prompt = case.prompt.clone();
                specs.push(VariantSpec { control: false, ..spec("+0".into(), first, size_of(first)?) });
                for (i, w) in add.iter().enumerate() {
                    prompt = format!("{}, {}", prompt.trim_end_matches([',', ' ']), w.trim());
                    specs.push(VariantSpec {
                        prompt: prompt.clone(),
                        added: Some(w.clone()),
                        control: false,
                        ..spec(format!("+{}", i + 1), first, size_of(first)?)
                    });
                }
            }
            Variant::Prompts { entries } => {
                let native = size_of(first)?;
                for e in entries {
                    let slices = if e.slots.is_empty() { tags(&e.prompt) } else { e.slots.iter().map(|(k, v)| format!("{k}={}", v.to_lowercase())).collect() };
                    specs.push(VariantSpec {
                        prompt: e.prompt.clone(),
                        overrides: Some(e.clone()),
                        slices,
                        ..spec(e.label.clone(), first, e.size.unwrap_or(native))
                    });
                }
            }
            Variant::Stack { loras } => {
                // Each LoRA alone, then every pair in the order the suite lists them.
                let size = size_of(first)?;
                let name = |a: &AdapterUse| suite.loras[a.lora].name.to_string();
                for a in loras {
                    specs.push(VariantSpec { stack: vec![*a], ..spec(name(a), first, size) });
                }
                for i in 0..loras.len() {
                    for k in i + 1..loras.len() {
                        let label = format!("{}+{}", name(&loras[i]), name(&loras[k]));
                        specs.push(VariantSpec { stack: vec![loras[i], loras[k]], ..spec(label, first, size) });
                    }
                }
            }
        }
        let mut variants = Vec::with_capacity(specs.len());
        for v in specs {
            let o = v.overrides.as_ref();
            let params = GenerationParams {
                steps: o.and_then(|o| o.steps).unwrap_or(s.steps),
                guidance: o.and_then(|o| o.guidance).unwrap_or(s.guidance),
                width: v.size.0,
                height: v.size.1,
                sampler: o.and_then(|o| o.sampler).unwrap_or(s.sampler),
                negative_prompt: o.and_then(|o| o.negative_prompt.clone()).unwrap_or_else(|| s.negative_prompt.clone()),
                clip_skip: s.clip_skip,
            };
            // A prompt file's `--d` seed replaces the case's seeds for that prompt.
            let seeds = match o.and_then(|o| o.seed) {
                Some(seed) => vec![seed],
                None => s.seeds.clone(),
            };
            let mut images = Vec::new();
            let mut controls = Vec::new();
            for &seed in &seeds {
                let job = Job { model: v.model.clone(), stack: v.stack.clone(), prompt: v.prompt.clone(), seed, params: params.clone() };
                images.push(table.add(job));
                if v.control {
                    controls.push(table.add(Job { model: v.model.clone(), stack: Vec::new(), prompt: v.prompt.clone(), seed, params: params.clone() }));
                }
            }
            variants.push(VariantPlan {
                score_text: score(&v.prompt),
                label: SafeName::slug(&v.label),
                model: v.model,
                prompt: v.prompt,
                stack: v.stack,
                params,
                floor: v.floor,
                weight: v.weight,
                added: v.added,
                seeds,
                images,
                controls,
                slices: v.slices,
            });
        }
        cases.push(CasePlan { case: ci, variants });
    }
    Ok(Plan { cases, jobs: table.jobs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::locate::ModelLocation;
    use std::path::PathBuf;

    fn single_file(name: &str) -> ModelRef {
        let written = format!("../models/{name}.safetensors");
        ModelRef {
            name: written.clone(),
            label: SafeName::for_model(&written),
            location: ModelLocation { name: written, folder: PathBuf::from("models"), unet_folder: None, single_file: Some(PathBuf::from(format!("models/{name}.safetensors"))), config: None },
        }
    }

    /// Two single files in one folder are two models: a base swap between them must plan two
    /// jobs, not compare one model with itself, and their labels keep no `../`.
    #[test]
    fn single_files_in_one_folder_are_different_jobs() {
        let job = |m: ModelRef| Job { model: m, stack: vec![], prompt: "a".into(), seed: 0, params: GenerationParams::default() };
        let (a, b) = (single_file("a"), single_file("b"));
        assert_ne!(job(a.clone()).dedup_key(), job(b.clone()).dedup_key());
        assert_eq!(job(a.clone()).dedup_key(), job(single_file("a")).dedup_key());
        let mut table = JobTable { jobs: Vec::new(), index: HashMap::new() };
        assert_ne!(table.add(job(a.clone())), table.add(job(b.clone())));
        for m in [a, b] {
            assert!(!m.label.as_str().contains(".."), "{}", m.label);
        }
    }
}
