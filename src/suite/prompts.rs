//! Prompt sets: many prompts in one case, as the field notes' "run 100 tricky prompts" asks.
//!
//! - A **matrix** fills the slots of a template (`"zorb, {size}, {place}, {bg} background"`) with
//!   every combination of the listed values, or a seeded sample of them; each expansion is named
//!   by its values (`small+on-the-left+sky`).
//! - A **prompt file** in kohya sd-scripts' sample-prompt format: one prompt a line, `#` starts a
//!   comment, and per-line flags override the case's settings: `--n` negative prompt, `--w` /
//!   `--h` size, `--d` seed, `--l` guidance, `--s` steps, `--ss` sampler.
//!
//! Both are pure text processing, tested without a model.

use std::collections::BTreeSet;

use crate::model::noise::Rng;
use crate::model::scheduler::SamplerKind;

/// One prompt of a set, with what it overrides.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptEntry {
    /// A file-name-safe name: the slot values (matrix) or `p001`, `p002`... (file).
    pub label: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub size: Option<(usize, usize)>,
    pub seed: Option<u64>,
    pub guidance: Option<f64>,
    pub steps: Option<usize>,
    pub sampler: Option<SamplerKind>,
    /// The line of a prompt file it came from.
    pub line: Option<usize>,
    /// A matrix expansion's slot values (`bg` → `grass`), in the template's order: the slices
    /// its measurements are grouped by.
    pub slots: Vec<(String, String)>,
}

/// The slot names of a template, in order of first appearance: `{size}` → `size`.
pub fn template_slots(template: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| format!("`{{` at byte {} is never closed", template.len() - rest.len() + open))?;
        let name = &after[..close];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`{{{name}}}` is not a slot name: use letters, digits and `_`"));
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err("a `}` without its `{`".into());
    }
    Ok(out)
}

/// A readable file-name part for a value: lower case, runs of other characters as one `-`.
fn part(value: &str) -> String {
    let mut s = String::new();
    for c in value.trim().chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "none".into() } else { s }
}

/// Every combination of `slots` (name, values) in `template`, or `sample` of them chosen by a
/// seeded draw; more than `max` combinations without `sample` is an error.
pub fn expand_matrix(template: &str, slots: &[(String, Vec<String>)], sample: Option<usize>, seed: u64, max: usize) -> Result<Vec<PromptEntry>, String> {
    let names = template_slots(template)?;
    for n in &names {
        if !slots.iter().any(|(s, _)| s == n) {
            return Err(format!("the prompt has a slot `{{{n}}}` the matrix gives no values for"));
        }
    }
    for (s, values) in slots {
        if !names.contains(s) {
            return Err(format!("the matrix gives values for `{s}`, which the prompt has no `{{{s}}}` for"));
        }
        if values.is_empty() {
            return Err(format!("slot `{s}` has no values"));
        }
    }
    // In the template's order, so names read like the prompt.
    let ordered: Vec<&Vec<String>> = names.iter().map(|n| &slots.iter().find(|(s, _)| s == n).expect("checked").1).collect();
    let total = ordered.iter().try_fold(1usize, |acc, v| acc.checked_mul(v.len())).unwrap_or(usize::MAX);
    let picks: Vec<usize> = match sample {
        Some(0) => return Err("`sample` must be at least 1".into()),
        Some(k) if k < total => {
            let mut rng = Rng::new(seed);
            let mut chosen = BTreeSet::new();
            // A partial Fisher–Yates over indices, without materialising a huge range.
            let mut swapped: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
            for i in 0..k {
                let j = i + rng.below(total - i);
                let at_j = *swapped.get(&j).unwrap_or(&j);
                let at_i = *swapped.get(&i).unwrap_or(&i);
                swapped.insert(j, at_i);
                chosen.insert(at_j);
            }
            chosen.into_iter().collect()
        }
        // A sample as large as the matrix is the whole matrix, whatever the cap.
        Some(_) => (0..total).collect(),
        None if total > max => {
            return Err(format!("the matrix has {total} combinations, more than max {max}: raise `max`, or draw `sample: N` of them"));
        }
        None => (0..total).collect(),
    };
    let mut out = Vec::with_capacity(picks.len());
    let mut labels = BTreeSet::new();
    for index in picks {
        // Mixed radix: the last slot varies fastest.
        let mut rem = index;
        let mut chosen = vec![""; ordered.len()];
        for (k, values) in ordered.iter().enumerate().rev() {
            chosen[k] = values[rem % values.len()].as_str();
            rem /= values.len();
        }
        let mut prompt = template.to_string();
        for (n, v) in names.iter().zip(&chosen) {
            prompt = prompt.replace(&format!("{{{n}}}"), v);
        }
        let mut label = chosen.iter().map(|v| part(v)).collect::<Vec<_>>().join("+");
        if label.len() > 90 || crate::names::SafeName::new(&label).is_err() {
            label = format!("m{index:05}");
        }
        if !labels.insert(label.clone()) {
            label = format!("{label}+{index}");
            labels.insert(label.clone());
        }
        let slots = names.iter().zip(&chosen).map(|(n, v)| (n.clone(), v.trim().to_string())).collect();
        out.push(PromptEntry { label, prompt: tidy(&prompt), slots, ..Default::default() });
    }
    Ok(out)
}

/// Empty values leave `, ,` behind: drop empty tags and extra spaces.
fn tidy(prompt: &str) -> String {
    prompt.split(',').map(|t| t.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(", ")
}

/// A prompt file in kohya's sample-prompt format. Errors carry the 1-based line.
pub fn parse_prompt_file(text: &str) -> Result<Vec<PromptEntry>, (usize, String)> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split(" --");
        let prompt = parts.next().unwrap_or("").trim();
        if prompt.is_empty() || prompt.starts_with("--") {
            return Err((line_no, "the line has flags but no prompt before them".into()));
        }
        let mut e = PromptEntry { prompt: prompt.to_string(), line: Some(line_no), label: format!("p{:03}", out.len() + 1), ..Default::default() };
        let (mut w, mut h) = (None, None);
        for flag in parts {
            let (name, value) = flag.split_once(' ').map(|(a, b)| (a, b.trim())).unwrap_or((flag, ""));
            let bad = |what: &str| (line_no, format!("--{name} {value:?}: {what}"));
            let number = |v: &str| v.parse::<usize>().map_err(|_| bad("expected a whole number"));
            match name.to_ascii_lowercase().as_str() {
                "n" => e.negative_prompt = Some(value.to_string()),
                "w" => w = Some(number(value)?),
                "h" => h = Some(number(value)?),
                "d" => e.seed = Some(value.parse::<u64>().map_err(|_| bad("expected a whole number"))?),
                "s" => {
                    let s = number(value)?;
                    if !(1..=1000).contains(&s) {
                        return Err(bad("steps must be between 1 and 1000"));
                    }
                    e.steps = Some(s);
                }
                "l" => {
                    let g: f64 = value.parse().map_err(|_| bad("expected a number"))?;
                    if !g.is_finite() {
                        return Err(bad("expected a finite number"));
                    }
                    e.guidance = Some(g);
                }
                "ss" => {
                    e.sampler = Some(match value.to_ascii_lowercase().as_str() {
                        "ddim" => SamplerKind::Ddim,
                        "euler" | "k_euler" => SamplerKind::Euler,
                        other => return Err((line_no, format!("--ss {other}: loragate samples with ddim or euler"))),
                    })
                }
                other => {
                    return Err((line_no, format!("unknown flag `--{other}`: kohya's sample prompts take --n, --w, --h, --d, --l, --s and --ss")));
                }
            }
        }
        e.size = match (w, h) {
            (None, None) => None,
            (Some(w), Some(h)) => Some((w, h)),
            (Some(x), None) | (None, Some(x)) => Some((x, x)),
        };
        if let Some((w, h)) = e.size
            && (w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0)
        {
            return Err((line_no, format!("size {w}x{h} is not a multiple of 8 (the VAE works on 8x8 pixel cells)")));
        }
        out.push(e);
    }
    if out.is_empty() {
        return Err((1, "the file has no prompts (only blank lines and `#` comments)".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slots(list: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        list.iter().map(|(n, v)| (n.to_string(), v.iter().map(|s| s.to_string()).collect())).collect()
    }

    #[test]
    fn every_combination_named_by_its_values() {
        let s = slots(&[("size", &["small", "large"]), ("place", &["on the left", "on the right"]), ("bg", &["sky", "night"])]);
        let e = expand_matrix("zorb, {size}, {place}, {bg} background", &s, None, 0, 100).unwrap();
        assert_eq!(e.len(), 8);
        assert_eq!(e[0].prompt, "zorb, small, on the left, sky background");
        assert_eq!(e[0].label, "small+on-the-left+sky");
        assert_eq!(e[7].label, "large+on-the-right+night");
        let labels: BTreeSet<_> = e.iter().map(|x| x.label.clone()).collect();
        assert_eq!(labels.len(), 8);
        // An empty value leaves no dangling comma.
        let e = expand_matrix("zorb, {style}, sky background", &slots(&[("style", &["", "sticker"])]), None, 0, 10).unwrap();
        assert_eq!(e[0].prompt, "zorb, sky background");
        assert_eq!(e[0].label, "none");
    }

    #[test]
    fn a_matrix_over_the_cap_is_refused_and_a_sample_is_seeded() {
        let big: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
        let s = vec![("a".to_string(), big.clone()), ("b".to_string(), big.clone()), ("c".to_string(), big)];
        let err = expand_matrix("{a} {b} {c}", &s, None, 0, 256).unwrap_err();
        assert!(err.contains("8000 combinations, more than max 256"), "{err}");
        let one = expand_matrix("{a} {b} {c}", &s, Some(100), 7, 256).unwrap();
        let again = expand_matrix("{a} {b} {c}", &s, Some(100), 7, 256).unwrap();
        let other = expand_matrix("{a} {b} {c}", &s, Some(100), 8, 256).unwrap();
        assert_eq!(one.len(), 100);
        assert_eq!(one, again, "the same seed draws the same prompts");
        assert_ne!(one, other);
        let distinct: BTreeSet<_> = one.iter().map(|e| e.prompt.clone()).collect();
        assert_eq!(distinct.len(), 100, "no combination twice");
        // A sample at least as large as the matrix is the whole matrix.
        assert_eq!(expand_matrix("{a}", &slots(&[("a", &["x", "y"])]), Some(5), 0, 1).unwrap().len(), 2);
    }

    #[test]
    fn slots_and_values_must_agree() {
        assert!(expand_matrix("{a} {b}", &slots(&[("a", &["x"])]), None, 0, 9).unwrap_err().contains("`{b}`"));
        assert!(expand_matrix("{a}", &slots(&[("a", &["x"]), ("z", &["y"])]), None, 0, 9).unwrap_err().contains("`z`"));
        assert!(expand_matrix("{a}", &slots(&[("a", &[])]), None, 0, 9).unwrap_err().contains("no values"));
        assert!(template_slots("{a b}").is_err());
        assert!(template_slots("{open").is_err());
        assert_eq!(template_slots("{x}, {y}, {x}").unwrap(), ["x", "y"]);
    }

    #[test]
    fn kohya_prompt_files_with_flags_and_comments() {
        let text = "# the field notes' tricky prompts\n\nzorb, large, sky background --n blurry, lowres --w 192 --h 128 --d 42 --l 7.5 --s 28\nzorb at night --ss euler\n  \nzorb --w 256\n";
        let e = parse_prompt_file(text).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].prompt, "zorb, large, sky background");
        assert_eq!(e[0].negative_prompt.as_deref(), Some("blurry, lowres"));
        assert_eq!((e[0].size, e[0].seed, e[0].guidance, e[0].steps), (Some((192, 128)), Some(42), Some(7.5), Some(28)));
        assert_eq!((e[0].line, e[0].label.as_str()), (Some(3), "p001"));
        assert_eq!(e[1].sampler, Some(SamplerKind::Euler));
        assert_eq!((e[2].size, e[2].line), (Some((256, 256)), Some(6)));
    }

    #[test]
    fn bad_lines_are_named_by_line() {
        for (text, line, needle) in [
            ("ok\nzorb --x 3\n", 2, "unknown flag `--x`"),
            ("zorb --w wide\n", 1, "--w \"wide\": expected a whole number"),
            ("# c\nzorb --w 130\n", 2, "not a multiple of 8"),
            ("zorb --ss k_lms\n", 1, "ddim or euler"),
            ("zorb --s 0\n", 1, "between 1 and 1000"),
            ("# only comments\n\n", 1, "no prompts"),
        ] {
            let (l, msg) = parse_prompt_file(text).unwrap_err();
            assert_eq!(l, line, "{text:?}: {msg}");
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }

    proptest! {
        /// Whatever the values, every expansion's label is a safe file name and unique.
        #[test]
        fn labels_are_safe_and_unique(values in proptest::collection::vec("\\PC{0,12}", 1..6)) {
            let s = vec![("x".to_string(), values.clone()), ("y".to_string(), vec!["a".into(), "a ".into()])];
            let e = expand_matrix("{x} {y}", &s, None, 0, 100).unwrap();
            let mut seen = BTreeSet::new();
            for x in &e {
                prop_assert!(crate::names::SafeName::new(&x.label).is_ok(), "{}", x.label);
                prop_assert!(seen.insert(x.label.clone()));
            }
        }
    }
}
