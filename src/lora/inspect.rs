//! A human-readable summary of a LoRA file (`loragate inspect`).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::keys::Component;
use super::apply::probable_family;
use super::{AdapterWeights, Algorithm, DoraAxis, KronHalf, LoraFile};

/// Metadata keys that say how a LoRA was made, shown first.
const KNOWN_METADATA: &[&str] = &[
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_sd_model_name",
    "ss_resolution",
    "ss_learning_rate",
    "ss_max_train_steps",
    "ss_num_train_images",
    "ss_output_name",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.implementation",
    "modelspec.resolution",
    "modelspec.trigger_phrase",
];

/// Groups a module name into the layer kind users think in (`to_q`, `ff.net.2`, `proj_in`...).
fn layer_kind(name: &str) -> &'static str {
    let flat = format!("_{}", name.replace('.', "_"));
    const KINDS: &[(&str, &str)] = &[
        ("_to_q", "to_q"),
        ("_to_k", "to_k"),
        ("_to_v", "to_v"),
        ("_to_out_0", "to_out.0"),
        ("_ff_net_0_proj", "ff.net.0.proj"),
        ("_ff_net_2", "ff.net.2"),
        ("_proj_in", "proj_in"),
        ("_proj_out", "proj_out"),
        ("_q_proj", "q_proj"),
        ("_k_proj", "k_proj"),
        ("_v_proj", "v_proj"),
        ("_out_proj", "out_proj"),
        ("_fc1", "mlp.fc1"),
        ("_fc2", "mlp.fc2"),
        ("_conv1", "resnet conv1"),
        ("_conv2", "resnet conv2"),
        ("_in_layers_2", "resnet conv1"),
        ("_out_layers_3", "resnet conv2"),
        ("_conv_shortcut", "resnet shortcut"),
        ("_skip_connection", "resnet shortcut"),
        ("_time_emb_proj", "time_emb_proj"),
        ("_emb_layers_1", "time_emb_proj"),
        ("_conv", "resampler conv"),
        ("_op", "resampler conv"),
    ];
    KINDS.iter().find(|(tail, _)| flat.ends_with(tail)).map(|(_, k)| *k).unwrap_or("other")
}

/// What an algorithm is, in a few words.
fn algorithm_words(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Lora => "low-rank pair",
        Algorithm::LoHa => "Hadamard product of two low-rank pairs",
        Algorithm::LoKr => "Kronecker product",
        Algorithm::Full => "full-weight difference",
    }
}

/// A LoKr half's shape and form: `[8, 8] whole`, `[8, 16] rank 2`, `[8, 8, 3, 3] Tucker rank 2`.
fn half_words(h: &KronHalf) -> String {
    match h {
        KronHalf::Full(_) => format!("{:?} whole", h.dims()),
        KronHalf::Product { .. } => format!("{:?} rank {}", h.dims(), h.rank().unwrap_or(0)),
        KronHalf::Tucker { .. } => format!("{:?} Tucker rank {}", h.dims(), h.rank().unwrap_or(0)),
    }
}

/// `a ×3, b ×1`, most frequent first, at most `max` items.
fn counted(items: impl IntoIterator<Item = String>, max: usize) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in items {
        *counts.entry(i).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let more = v.len().saturating_sub(max);
    let mut out: Vec<String> = v.into_iter().take(max).map(|(k, n)| format!("{k} ×{n}")).collect();
    if more > 0 {
        out.push(format!("{more} more"));
    }
    out.join(", ")
}

pub fn summary(lora: &LoraFile) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "file:        {}", lora.path.display());
    let _ = writeln!(s, "format:      {}", lora.format);
    let mut by_algorithm: BTreeMap<Algorithm, (usize, usize)> = BTreeMap::new();
    for m in &lora.modules {
        let e = by_algorithm.entry(m.algorithm()).or_default();
        e.0 += 1;
        e.1 += usize::from(m.weights.has_tucker());
    }
    let algorithms: Vec<String> = by_algorithm
        .iter()
        .map(|(a, (n, tucker))| {
            let cores = if *tucker > 0 { format!(", {tucker} with a Tucker core") } else { String::new() };
            format!("{a} ({}) ×{n}{cores}", algorithm_words(*a))
        })
        .collect();
    let _ = writeln!(s, "algorithm:   {}", algorithms.join("; "));
    let dora: Vec<&super::Dora> = lora.modules.iter().filter_map(|m| m.dora.as_ref()).collect();
    if !dora.is_empty() {
        let axes = counted(
            dora.iter().map(|d| match d.axis {
                DoraAxis::Output => "per output channel".to_string(),
                DoraAxis::Input => "per input channel".to_string(),
            }),
            2,
        );
        let _ = writeln!(s, "DoRA:        magnitudes on {} of {} modules ({axes}); norms recomputed from the merged weight", dora.len(), lora.modules.len());
    }
    let _ = writeln!(s, "tensors:     {} ({} modules)", lora.tensor_count, lora.modules.len());
    let ranks = lora.ranks();
    let unranked = lora.modules.iter().filter(|m| m.rank().is_none()).count();
    let mut rank_line: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    if unranked > 0 {
        rank_line.push(format!("none on {unranked} modules (whole LoKr halves or full diffs)"));
    }
    let _ = writeln!(s, "rank:        {}", rank_line.join(", "));
    let kron: Vec<String> = lora
        .modules
        .iter()
        .filter_map(|m| match &m.weights {
            AdapterWeights::Kronecker { w1, w2 } => Some(format!("w1 {} ⊗ w2 {}", half_words(w1), half_words(w2))),
            _ => None,
        })
        .collect();
    if !kron.is_empty() {
        let _ = writeln!(s, "factors:     {}", counted(kron, 4));
    }
    let mut alphas: Vec<String> = lora
        .modules
        .iter()
        .map(|m| m.alpha.map(|a| format!("{a}")).unwrap_or_else(|| "none (scale 1)".into()))
        .collect();
    alphas.sort();
    alphas.dedup();
    let _ = writeln!(s, "alpha:       {}", alphas.join(", "));
    let mut scales: Vec<String> = lora.modules.iter().map(|m| format!("{:.4}", m.scale())).collect();
    scales.sort();
    scales.dedup();
    let mut rules = Vec::new();
    if lora.modules.iter().any(|m| m.rank().is_some()) {
        rules.push("alpha / rank");
    }
    if lora.modules.iter().any(|m| m.algorithm() == Algorithm::LoKr && m.rank().is_none()) {
        rules.push("1 for whole LoKr halves, alpha unused");
    }
    if lora.modules.iter().any(|m| m.algorithm() == Algorithm::Full) {
        rules.push("1 for full diffs");
    }
    let _ = writeln!(s, "scale:       {} ({})", scales.join(", "), rules.join("; "));
    let family = probable_family(lora).map(|f| f.to_string()).unwrap_or_else(|| "unknown".into());
    let _ = writeln!(s, "base family: {family} (probable, from the layer widths)");
    let mut by_component: BTreeMap<Component, BTreeMap<&str, usize>> = BTreeMap::new();
    for m in &lora.modules {
        *by_component.entry(m.component).or_default().entry(layer_kind(m.name.as_str())).or_default() += 1;
    }
    let _ = writeln!(s, "targets:");
    for (c, kinds) in &by_component {
        let list: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        let _ = writeln!(s, "  {:<15} {}", c.prefix(), list.join(", "));
    }
    if lora.metadata.is_empty() {
        let _ = writeln!(s, "metadata:    none");
    } else {
        let _ = writeln!(s, "metadata:");
        for k in KNOWN_METADATA {
            if let Some(v) = lora.metadata.get(*k) {
                let _ = writeln!(s, "  {k}: {}", clip(v));
            }
        }
        for (k, v) in &lora.metadata {
            if !KNOWN_METADATA.contains(&k.as_str()) {
                let _ = writeln!(s, "  {k}: {}", clip(v));
            }
        }
    }
    s
}

fn clip(v: &str) -> String {
    let one_line = v.replace('\n', " ");
    if one_line.chars().count() > 100 {
        format!("{}… ({} chars)", one_line.chars().take(100).collect::<String>(), one_line.chars().count())
    } else {
        one_line
    }
}
