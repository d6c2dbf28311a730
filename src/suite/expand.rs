//! Cases → concrete generations.
//!
//! Each case expands into variants (the prompt as written, each tag order, each ladder rung,
//! each base model, each sweep weight, each bisection prefix); each variant into one image per
//! seed, plus the same seeds without LoRAs as the automatic control. Identical generations are
//! planned once, whichever cases ask for them.

use std::collections::HashMap;

/// One variant before it becomes jobs: (label, model, prompt, stack, size, floor, weight,
/// added word, with a control).
type VariantSpec = (String, ModelRef, String, Vec<AdapterUse>, (usize, usize), f64, Option<f64>, Option<String>, bool);

use super::{AdapterUse, ModelRef, Suite, Variant};
use crate::error::Result;
use crate::model::GenerationParams;
use crate::model::pipeline::native_size;

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
    /// A structural identity for de-duplication within a plan.
    fn dedup_key(&self) -> String {
        let stack: Vec<String> = self.stack.iter().map(|a| format!("{}@{}", a.lora, a.weight)).collect();
        let p = &self.params;
        format!(
            "{}|{}|{}|{}|{}x{}|{}|{}|{}|{}|{}",
            self.model.location.folder.display(),
            self.model.location.unet_folder.as_ref().map(|u| u.display().to_string()).unwrap_or_default(),
            stack.join(","),
            self.prompt,
            p.width,
            p.height,
            p.steps,
            p.guidance,
            p.sampler.name(),
            p.negative_prompt,
            self.seed
        ) + &format!("|{}", p.clip_skip)
    }
}

/// A variant of a case, with the jobs of its images.
#[derive(Debug, Clone)]
pub struct VariantPlan {
    /// `main`, `order-2`, `192x192`, `tiny-sticker`, `w0.5`, `+2`.
    pub label: String,
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

/// Expands every case of `suite`.
pub fn expand(suite: &Suite) -> Result<Plan> {
    let mut table = JobTable { jobs: Vec::new(), index: HashMap::new() };
    let mut native: HashMap<ModelRef, (usize, usize)> = HashMap::new();
    let mut cases = Vec::with_capacity(suite.cases.len());
    for (ci, case) in suite.cases.iter().enumerate() {
        let s = &case.settings;
        let base_params = |size: (usize, usize)| GenerationParams {
            steps: s.steps,
            guidance: s.guidance,
            width: size.0,
            height: size.1,
            sampler: s.sampler,
            negative_prompt: s.negative_prompt.clone(),
            clip_skip: s.clip_skip,
        };
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
                super::resolve::score_text(prompt, &loras_of(&case.adapters))
            }
        };
        let mut specs: Vec<VariantSpec> = Vec::new();
        let floor = case.thresholds.clip_floor;
        match &case.variant {
            Variant::Single => {
                for m in &case.models {
                    let label = if case.models.len() > 1 { m.name.clone() } else { "main".into() };
                    specs.push((label, m.clone(), case.prompt.clone(), case.adapters.clone(), size_of(m)?, floor, None, None, case.control));
                }
            }
            Variant::BaseSwap => {
                for m in &case.models {
                    specs.push((m.name.clone(), m.clone(), case.prompt.clone(), case.adapters.clone(), size_of(m)?, floor, None, None, case.control));
                }
            }
            Variant::WordOrder { prompts } => {
                let m = &case.models[0];
                for (i, p) in prompts.iter().enumerate() {
                    specs.push((format!("order-{i}"), m.clone(), p.clone(), case.adapters.clone(), size_of(m)?, floor, None, None, case.control));
                }
            }
            Variant::Ladder { rungs } => {
                let m = &case.models[0];
                for (size, f) in rungs {
                    specs.push((format!("{}x{}", size.0, size.1), m.clone(), case.prompt.clone(), case.adapters.clone(), *size, f.unwrap_or(floor), None, None, case.control));
                }
            }
            Variant::Sweep { adapter, weights } => {
                let m = &case.models[0];
                for w in weights {
                    let mut stack = case.adapters.clone();
                    stack[*adapter].weight = *w;
                    // The control (no LoRA) of the first weight doubles as the base render that
                    // weight 0 must reproduce.
                    specs.push((format!("w{w}"), m.clone(), case.prompt.clone(), stack, size_of(m)?, floor, Some(*w), None, case.control));
                }
            }
            Variant::Bisect { add } => {
                let m = &case.models[0];
                let mut prompt = case.prompt.clone();
                specs.push(("+0".into(), m.clone(), prompt.clone(), case.adapters.clone(), size_of(m)?, floor, None, None, false));
                for (i, w) in add.iter().enumerate() {
                    prompt = format!("{}, {}", prompt.trim_end_matches([',', ' ']), w.trim());
                    specs.push((format!("+{}", i + 1), m.clone(), prompt.clone(), case.adapters.clone(), size_of(m)?, floor, None, Some(w.clone()), false));
                }
            }
        }
        let mut variants = Vec::with_capacity(specs.len());
        for (label, model, prompt, stack, size, floor, weight, added, control) in specs {
            let params = base_params(size);
            let mut images = Vec::new();
            let mut controls = Vec::new();
            for &seed in &s.seeds {
                images.push(table.add(Job { model: model.clone(), stack: stack.clone(), prompt: prompt.clone(), seed, params: params.clone() }));
                if control {
                    controls.push(table.add(Job { model: model.clone(), stack: Vec::new(), prompt: prompt.clone(), seed, params: params.clone() }));
                }
            }
            variants.push(VariantPlan {
                score_text: score(&prompt),
                label,
                model,
                prompt,
                stack,
                params,
                floor,
                weight,
                added,
                seeds: s.seeds.clone(),
                images,
                controls,
            });
        }
        cases.push(CasePlan { case: ci, variants });
    }
    Ok(Plan { cases, jobs: table.jobs })
}
