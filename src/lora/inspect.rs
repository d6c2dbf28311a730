//! A human-readable summary of a LoRA file (`loragate inspect`).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::keys::Component;
use super::apply::probable_family;
use super::LoraFile;

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

pub fn summary(lora: &LoraFile) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "file:        {}", lora.path.display());
    let _ = writeln!(s, "format:      {}", lora.format);
    let _ = writeln!(s, "tensors:     {} ({} modules)", lora.tensor_count, lora.modules.len());
    let ranks = lora.ranks();
    let _ = writeln!(s, "rank:        {}", ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "));
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
    let _ = writeln!(s, "scale:       {} (alpha / rank)", scales.join(", "));
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
