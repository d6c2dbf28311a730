//! A starter suite from what a LoRA file says about itself (`loragate init`): kohya's metadata
//! carries the tags by frequency (`ss_tag_frequency`, per dataset folder), the training
//! resolution and the base model. Pure text processing, tested without a model.

use std::collections::BTreeMap;
use std::fmt::Write;

/// What a LoRA's metadata tells a starter suite.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraFacts {
    /// The trigger and how it was found (`in 300 of 300 captions of 1_zorb`).
    pub trigger: Option<(String, String)>,
    /// The most frequent other tags of the trigger's folder (or of all folders), most frequent
    /// first.
    pub tags: Vec<String>,
    /// Up to two of those that can stand together in one prompt: the second is skipped when the
    /// two together cover most of the folder's captions, as alternatives do ("large", "small").
    pub prompt_tags: Vec<String>,
    /// A subject of the other folders (the regularisation images), for a prompt the LoRA must
    /// leave alone.
    pub other_subject: Option<String>,
    /// Tags that name a background, most frequent first.
    pub backgrounds: Vec<String>,
    /// The training resolution (width, height).
    pub resolution: Option<(usize, usize)>,
}

/// Reads the facts from a LoRA's metadata (kohya `ss_*` and `modelspec.*` keys).
pub fn facts(metadata: &BTreeMap<String, String>) -> LoraFacts {
    let freq: BTreeMap<String, BTreeMap<String, f64>> = metadata.get("ss_tag_frequency").and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default();
    let images: BTreeMap<String, f64> = metadata
        .get("ss_dataset_dirs")
        .and_then(|t| serde_json::from_str::<BTreeMap<String, serde_json::Value>>(t).ok())
        .map(|dirs| dirs.into_iter().filter_map(|(d, v)| Some((d, v["img_count"].as_f64()?))).collect())
        .unwrap_or_default();
    let clean = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let trigger = metadata
        .get("modelspec.trigger_phrase")
        .and_then(|p| p.split(',').map(clean).find(|t| !t.is_empty()))
        .map(|t| (t, "modelspec.trigger_phrase".to_string()))
        .or_else(|| trigger_from_frequencies(&freq, &images));
    // The folder the trigger came from describes the character; else every folder together.
    let home: Vec<&BTreeMap<String, f64>> = match &trigger {
        Some((t, _)) => freq.values().filter(|tags| tags.contains_key(t)).collect(),
        None => freq.values().collect(),
    };
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for tags in home {
        for (t, c) in tags {
            *counts.entry(clean(t)).or_default() += c;
        }
    }
    let captions: f64 = match &trigger {
        Some((t, _)) => freq.iter().filter(|(_, tags)| tags.contains_key(t)).map(|(d, tags)| images.get(d).copied().unwrap_or_else(|| tags.values().copied().fold(0.0, f64::max))).sum(),
        None => counts.values().copied().fold(0.0, f64::max),
    };
    let mut ranked: Vec<(String, f64)> = counts.into_iter().filter(|(t, _)| !t.is_empty() && trigger.as_ref().is_none_or(|(tr, _)| tr != t)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut prompt_tags: Vec<(String, f64)> = Vec::new();
    for (t, c) in ranked.iter().filter(|(t, _)| !t.ends_with(" background")) {
        if prompt_tags.len() == 2 {
            break;
        }
        // Alternatives split the captions between them; tags that go together do not.
        if prompt_tags.iter().any(|(_, pc)| pc + c >= 0.6 * captions) {
            continue;
        }
        prompt_tags.push((t.clone(), *c));
    }
    let other_subject = match &trigger {
        Some((t, _)) => {
            let mut others: Vec<(&String, f64)> =
                freq.values().filter(|tags| !tags.contains_key(t)).flat_map(|tags| tags.iter().map(|(k, c)| (k, *c))).filter(|(k, _)| !ranked.iter().any(|(r, _)| r == *k)).collect();
            others.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
            others.first().map(|(k, _)| clean(k))
        }
        None => None,
    };
    let prompt_tags: Vec<String> = prompt_tags.into_iter().map(|(t, _)| t).collect();
    let (backgrounds, tags): (Vec<String>, Vec<String>) = ranked.into_iter().map(|(t, _)| t).partition(|t| t.ends_with(" background"));
    let resolution = metadata.get("ss_resolution").and_then(|r| parse_resolution(r)).or_else(|| metadata.get("modelspec.resolution").and_then(|r| parse_resolution(r)));
    LoraFacts { trigger, tags, prompt_tags, other_subject, backgrounds, resolution }
}

/// The trigger from tag frequencies: a tag in nearly every caption of one dataset folder and
/// rare in the others (the regularisation images), as kohya's folders are laid out.
fn trigger_from_frequencies(freq: &BTreeMap<String, BTreeMap<String, f64>>, images: &BTreeMap<String, f64>) -> Option<(String, String)> {
    let mut best: Option<(f64, String, String)> = None;
    for (dir, tags) in freq {
        // Without an image count, the most frequent tag of the folder stands in for it.
        let n = images.get(dir).copied().unwrap_or_else(|| tags.values().copied().fold(0.0, f64::max));
        if n <= 0.0 {
            continue;
        }
        for (tag, &count) in tags {
            let share = count / n;
            let elsewhere = freq.iter().filter(|(d, _)| *d != dir).any(|(d, other)| {
                let m = images.get(d).copied().unwrap_or_else(|| other.values().copied().fold(0.0, f64::max)).max(1.0);
                other.get(tag).is_some_and(|c| c / m > 0.2)
            });
            if share >= 0.8 && !elsewhere && best.as_ref().is_none_or(|b| share > b.0 || (share == b.0 && tag.len() < b.1.len())) {
                let how = format!("in {count} of {n} captions of {dir}");
                best = Some((share, tag.trim().to_string(), how));
            }
        }
    }
    if let Some((_, t, how)) = best {
        return Some((t, how));
    }
    // kohya's folder name `10_name` names the concept.
    freq.keys().find_map(|d| {
        let name = d.split_once('_').filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))?.1.trim();
        (!name.is_empty() && freq[d].contains_key(name)).then(|| (name.to_string(), format!("the dataset folder {d}")))
    })
}

/// `(512, 512)`, `512,768`, `512x768`, `512`.
pub fn parse_resolution(text: &str) -> Option<(usize, usize)> {
    let nums: Vec<usize> = text.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
    match nums[..] {
        [w] if w > 0 => Some((w, w)),
        [w, h, ..] if w > 0 && h > 0 => Some((w, h)),
        _ => None,
    }
}

/// What the starter suite is written from.
#[derive(Debug, Clone)]
pub struct StarterSpec<'a> {
    /// The suite's and the LoRA's name.
    pub name: &'a str,
    /// The LoRA file, relative to the suite file.
    pub file: &'a str,
    pub model: &'a str,
    pub scorer: &'a str,
    pub facts: &'a LoraFacts,
    /// Where the facts came from, for the header (`kohya metadata`, `no metadata`).
    pub source: &'a str,
}

/// Backgrounds and styles that break characters in the field notes, added to the LoRA's own.
const KNOWN_BACKGROUNDS: [&str; 2] = ["white background", "night background"];
const KNOWN_STYLES: [&str; 3] = ["sketch", "oil painting", "pixelated"];

fn round8(x: f64) -> usize {
    ((x / 8.0).round() as usize).max(1) * 8
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string")
}

/// The starter suite (YAML), and what a person should fill in.
pub fn starter_suite(s: &StarterSpec) -> (String, Vec<String>) {
    let f = s.facts;
    let mut todo = Vec::new();
    let trigger = f.trigger.as_ref().map(|(t, _)| t.as_str());
    let tags: Vec<&str> = f.tags.iter().map(String::as_str).take(4).collect();
    let mut described: Vec<&str> = f.prompt_tags.iter().map(String::as_str).collect();
    described.extend(f.backgrounds.first().map(String::as_str));
    let with_trigger = |rest: &[&str]| trigger.into_iter().chain(rest.iter().copied()).collect::<Vec<_>>().join(", ");
    let mut y = String::new();
    let _ = writeln!(y, "# Starter suite for {}, written by `loragate init` from {}.", s.file, s.source);
    let _ = writeln!(y, "# A first run has no accepted version: run it, look at out/{}/report.html, accept what", s.name);
    let _ = writeln!(y, "# is right (`loragate baseline review`), then tighten the thresholds to what you measured.");
    let _ = writeln!(y, "# Every field: `loragate schema`; what each check means: docs/checks-and-verdicts.md.");
    let _ = writeln!(y, "name: {}", s.name);
    let _ = writeln!(y, "models: [{}]", quote(s.model));
    let _ = writeln!(y, "scorer: {}", quote(s.scorer));
    let _ = writeln!(y, "loras:\n  - name: {}\n    file: {}", s.name, quote(s.file));
    match &f.trigger {
        Some((t, how)) => {
            let _ = writeln!(y, "    trigger: {}            # {how}", quote(t));
            let _ = writeln!(y, "    class_word: \"\"          # what CLIP reads instead of the trigger, e.g. \"girl\"");
        }
        None => {
            todo.push(format!("{}: the trigger word (the metadata names none): set `trigger:` in the suite", s.name));
            let _ = writeln!(y, "    # trigger: <the word that calls the character>   # not in the file's metadata: fill in");
        }
    }
    let _ = writeln!(y, "    # references: [refs/]      # the character sheet: identity is scored against it on every prompt");
    let _ = writeln!(y, "    # training_set: data/      # its training images: the memorization check fails outputs that copy them");
    let _ = writeln!(y, "defaults:\n  seeds: [0, 1, 2, 3]       # the field notes run four\n  steps: 20");
    if let Some((w, h)) = f.resolution {
        let _ = writeln!(y, "  size: {w}x{h}            # the training resolution");
    }
    let _ = writeln!(y, "  adapters: [{}]", s.name);
    let _ = writeln!(y, "thresholds:");
    let _ = writeln!(y, "  clip_floor: 0.25          # the field notes' rule: retrain whatever scores under 0.25");
    let _ = writeln!(y, "  clip_aggregate: best      # best of the four seeds, as people pick");
    let _ = writeln!(y, "  per_seed: false");
    let _ = writeln!(y, "  # The scored text has no word for the character (the trigger is removed), so the base");
    let _ = writeln!(y, "  # model's plain subject can match it better: start loose, then set what you measure.");
    let _ = writeln!(y, "  control_drop: 0.4");
    let _ = writeln!(y, "  word_order: 0.8           # the least alike tag order and seed, image similarity 0-1");
    let _ = writeln!(y, "  identity: 0.25");
    let _ = writeln!(y, "cases:");
    if described.is_empty() && trigger.is_none() {
        todo.push(format!("{}: prompts (the metadata has no tags): write them under `cases:`", s.name));
    }
    let base_prompt = {
        let p = with_trigger(&described);
        if p.is_empty() { "<your prompt>".to_string() } else { p }
    };
    let _ = writeln!(y, "  - name: training-prompt\n    prompt: {}", quote(&base_prompt));
    if base_prompt.split(',').count() >= 2 {
        let _ = writeln!(y, "  - name: tag-order           # \"white hair, red eyes\" against \"red eyes, white hair\"\n    prompt: {}\n    word_order: {{ sample: 6, seed: 1 }}", quote(&base_prompt));
    }
    if let Some((w, h)) = f.resolution {
        let rung = |k: f64| format!("{}x{}", round8(w as f64 * k), round8(h as f64 * k));
        let _ = writeln!(y, "  - name: ladder              # trained at {w}x{h}: does it hold at 1.5x and 2x?");
        let _ = writeln!(y, "    prompt: {}", quote(&base_prompt));
        let _ = writeln!(y, "    ladder: [{{ size: {} }}, {{ size: {}, clip_floor: 0.15 }}, {{ size: {}, clip_floor: 0.1 }}]", rung(1.0), rung(1.5), rung(2.0));
    }
    match (&f.other_subject, trigger) {
        (Some(other), Some(_)) => {
            let mut prompt = vec![other.as_str()];
            prompt.extend(described.iter().copied());
            let _ = writeln!(y, "  - name: no-trigger          # another subject, no trigger: the LoRA must leave the picture alone");
            let _ = writeln!(y, "    prompt: {}\n    thresholds: {{ leak: 0.1 }}      # mean abs pixel change 0-1; tighten to what you measure", quote(&prompt.join(", ")));
        }
        (None, Some(_)) => {
            let _ = writeln!(y, "  # Another subject without the trigger: the LoRA must leave it alone (the metadata names none).");
            let _ = writeln!(y, "  # - name: no-trigger\n  #   prompt: \"<another subject>, {}\"\n  #   thresholds: {{ leak: 0.1 }}", described.join(", "));
        }
        _ => {}
    }
    // Tricky prompts: the LoRA's own tags on backgrounds and in styles it may never have seen.
    let mut backgrounds: Vec<String> = f.backgrounds.iter().take(2).cloned().collect();
    if let Some(rare) = f.backgrounds.last().filter(|b| !backgrounds.contains(b)) {
        backgrounds.push(rare.clone());
    }
    for b in KNOWN_BACKGROUNDS {
        if !backgrounds.iter().any(|x| x == b) && backgrounds.len() < 4 {
            backgrounds.push(b.to_string());
        }
    }
    if !tags.is_empty() {
        let list = |xs: &[&str]| xs.iter().map(|x| quote(x)).collect::<Vec<_>>().join(", ");
        let bgs: Vec<&str> = backgrounds.iter().map(String::as_str).collect();
        let template = match trigger {
            Some(t) => format!("{t}, {{tag}}, {{style}}, {{bg}}"),
            None => "{tag}, {style}, {bg}".to_string(),
        };
        let _ = writeln!(y, "  - name: tricky              # a new background melts the face; a style it never saw");
        let _ = writeln!(y, "    prompt: {}", quote(&template));
        let _ = writeln!(y, "    matrix:\n      tag: [{}]\n      style: [{}]\n      bg: [{}]", list(&tags), list(&KNOWN_STYLES), list(&bgs));
        let _ = writeln!(y, "      sample: 12              # of {}; raise it to run more", tags.len() * KNOWN_STYLES.len() * bgs.len());
        let _ = writeln!(y, "      seed: 1");
    }
    let _ = writeln!(y, "  # Another base model (\"an SD 1.5 LoRA refuses to run on another base\"):");
    let _ = writeln!(y, "  # - name: other-base\n  #   prompt: {}\n  #   models: [{}, path/to/another/base]", quote(&base_prompt), quote(s.model));
    let _ = writeln!(y, "  # A stacking partner (\"two LoRAs stacked at 0.7/0.3 fight\"): declare it under `loras:`, then");
    let _ = writeln!(y, "  # - name: stacked\n  #   prompt: {}\n  #   stack: {{ loras: [{}, partner], weights: [0.7, 0.3] }}", quote(&base_prompt), s.name);
    (y, todo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_trigger_is_the_tag_in_every_caption_of_one_folder_and_rare_elsewhere() {
        let m = meta(&[
            ("ss_tag_frequency", r#"{"10_zorb": {"zorb": 98, "large": 60, "grass background": 20, "small": 40}, "1_shapes": {"large": 70, "red circle": 30, "sky background": 12}}"#),
            ("ss_dataset_dirs", r#"{"10_zorb": {"n_repeats": 10, "img_count": 100}, "1_shapes": {"n_repeats": 1, "img_count": 100}}"#),
            ("ss_resolution", "(512, 768)"),
        ]);
        let f = facts(&m);
        assert_eq!(f.trigger, Some(("zorb".into(), "in 98 of 100 captions of 10_zorb".into())));
        assert_eq!(f.tags, vec!["large", "small"], "the trigger's folder, most frequent first, backgrounds apart");
        assert_eq!(f.prompt_tags, vec!["large"], "large and small split the captions: alternatives");
        assert_eq!(f.other_subject.as_deref(), Some("red circle"), "the regularisation folder's subject");
        assert_eq!(f.backgrounds, vec!["grass background"]);
        assert_eq!(f.resolution, Some((512, 768)));
        // A tag common to both folders is no trigger; modelspec's trigger phrase wins.
        let m = meta(&[("ss_tag_frequency", r#"{"1_a": {"large": 100}, "1_b": {"large": 100}}"#), ("modelspec.trigger_phrase", "sks person, photo")]);
        assert_eq!(facts(&m).trigger.unwrap().0, "sks person");
        let m = meta(&[("ss_tag_frequency", r#"{"1_a": {"large": 100}, "1_b": {"large": 100}}"#)]);
        assert_eq!(facts(&m).trigger, None);
        // No metadata at all: nothing known.
        assert_eq!(facts(&BTreeMap::new()), LoraFacts::default());
        assert_eq!(parse_resolution("512"), Some((512, 512)));
        assert_eq!(parse_resolution("1024x768"), Some((1024, 768)));
        assert_eq!(parse_resolution("none"), None);
    }

    #[test]
    fn the_starter_suite_has_every_kind_of_case_and_says_what_to_fill_in() {
        let f = LoraFacts {
            trigger: Some(("zorb".into(), "in 300 of 300 captions of 1_zorb".into())),
            tags: vec!["large".into(), "small".into(), "on the left".into()],
            prompt_tags: vec!["large".into(), "on the left".into()],
            other_subject: Some("red circle".into()),
            backgrounds: vec!["grass background".into(), "sky background".into(), "night background".into()],
            resolution: Some((128, 128)),
        };
        let spec = StarterSpec { name: "zorb", file: "../loras/zorb.safetensors", model: "tiny", scorer: "tiny-clip", facts: &f, source: "its kohya metadata" };
        let (yaml, todo) = starter_suite(&spec);
        assert!(todo.is_empty(), "{todo:?}");
        for needle in ["trigger: \"zorb\"", "prompt: \"zorb, large, on the left, grass background\"", "prompt: \"red circle, large, on the left, grass background\"", "word_order:", "ladder: [{ size: 128x128 }, { size: 192x192, clip_floor: 0.15 }, { size: 256x256", "leak: 0.1", "matrix:", "\"grass background\"", "\"white background\"", "# - name: other-base", "stack: { loras: [zorb, partner]"] {
            assert!(yaml.contains(needle), "{needle} missing:\n{yaml}");
        }
        // Without metadata: still a suite, with what to fill in.
        let none = LoraFacts::default();
        let (yaml, todo) = starter_suite(&StarterSpec { facts: &none, source: "no metadata", ..spec });
        assert!(yaml.contains("# trigger: <the word") && yaml.contains("prompt: \"<your prompt>\""), "{yaml}");
        assert_eq!(todo.len(), 2, "{todo:?}");
    }
}
