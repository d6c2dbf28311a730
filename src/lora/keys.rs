//! Parsing LoRA tensor names of the three formats into (component, module, role).
//!
//! | format    | example key                                                                 |
//! |-----------|-----------------------------------------------------------------------------|
//! | kohya     | `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, `….alpha` |
//! | diffusers | `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight` |
//! | PEFT      | `base_model.model.down_blocks.0….to_q.lora_A.weight` (alpha in adapter_config.json) |
//!
//! kohya names also carry the LyCORIS algorithms (`….hada_w1_a`, `….lokr_w1`, `….lora_mid.weight`,
//! `….diff`) and DoRA's magnitude (`….dora_scale`); PEFT names carry DoRA's as
//! `….lora_magnitude_vector`. Which algorithm a module uses is decided from all of its tensors
//! together (`parse_modules` in `lora/mod.rs`).
//!
//! kohya names flatten the module path with `_`, which is ambiguous on its own
//! (`down_blocks` vs `down.blocks`), so they stay [`ModuleName::Flat`] until they are matched
//! against the model's real module list in [`super::resolve`].

/// Which part of the pipeline a LoRA module patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    /// The prefix of this component's layers in [`crate::model::adapters::AdapterTargets`].
    pub fn prefix(&self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// A module path, either dotted (exact) or kohya-flattened (resolved later).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleName {
    Dotted(String),
    Flat(String),
}

impl ModuleName {
    pub fn as_str(&self) -> &str {
        match self {
            ModuleName::Dotted(s) | ModuleName::Flat(s) => s,
        }
    }
}

/// What a tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Down,
    Up,
    Alpha,
    /// LoCon's Tucker core between down and up on a k×k convolution (`lora_mid.weight`).
    Mid,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    /// A full-weight difference (LyCORIS "full").
    Diff,
    /// A full bias difference.
    DiffBias,
    /// DoRA's magnitude as kohya and LyCORIS write it (`[out, 1, …]` or `[1, in, …]`).
    DoraScale,
    /// DoRA's magnitude as PEFT writes it (`[out]`, or `[1, out, 1, 1]` for convolutions).
    Magnitude,
}

impl Role {
    /// The kohya/LyCORIS suffix of this role (after the module name and a dot).
    pub fn kohya_suffix(&self) -> &'static str {
        KOHYA_SUFFIXES.iter().find(|(_, r)| r == self).map(|(s, _)| *s).expect("every role has a kohya suffix")
    }
}

/// The tensors kohya sd-scripts and LyCORIS write after a module's flattened name.
const KOHYA_SUFFIXES: &[(&str, Role)] = &[
    ("lora_down.weight", Role::Down),
    ("lora_up.weight", Role::Up),
    ("alpha", Role::Alpha),
    ("lora_mid.weight", Role::Mid),
    ("hada_w1_a", Role::HadaW1A),
    ("hada_w1_b", Role::HadaW1B),
    ("hada_w2_a", Role::HadaW2A),
    ("hada_w2_b", Role::HadaW2B),
    ("hada_t1", Role::HadaT1),
    ("hada_t2", Role::HadaT2),
    ("lokr_w1", Role::LokrW1),
    ("lokr_w1_a", Role::LokrW1A),
    ("lokr_w1_b", Role::LokrW1B),
    ("lokr_w2", Role::LokrW2),
    ("lokr_w2_a", Role::LokrW2A),
    ("lokr_w2_b", Role::LokrW2B),
    ("lokr_t2", Role::LokrT2),
    ("diff", Role::Diff),
    ("diff_b", Role::DiffBias),
    ("dora_scale", Role::DoraScale),
    ("lora_magnitude_vector", Role::Magnitude),
];

/// Tensors of adapter types loragate does not apply, by the suffix they end in, with the reason
/// given to the user. Refused by name, so that a file of such an adapter is never mistaken for
/// something else or applied in part.
const REFUSED: &[(&str, &str)] = &[
    ("on_input", "LyCORIS IA³ (`weight` and `on_input`: learned per-channel scales of activations)"),
    ("a1.weight", "LyCORIS GLoRA (`a1`/`a2`/`b1`/`b2`: a generalised LoRA with its own bias path)"),
    ("a2.weight", "LyCORIS GLoRA (`a1`/`a2`/`b1`/`b2`: a generalised LoRA with its own bias path)"),
    ("b1.weight", "LyCORIS GLoRA (`a1`/`a2`/`b1`/`b2`: a generalised LoRA with its own bias path)"),
    ("b2.weight", "LyCORIS GLoRA (`a1`/`a2`/`b1`/`b2`: a generalised LoRA with its own bias path)"),
    ("bm.weight", "LyCORIS GLoRA (`a1`/`a2`/`b1`/`b2`: a generalised LoRA with its own bias path)"),
    ("oft_blocks", "OFT/BOFT (orthogonal finetuning: a rotation of the weight, not an added delta)"),
    ("oft_diag", "OFT/BOFT (orthogonal finetuning: a rotation of the weight, not an added delta)"),
    ("rescale", "OFT/BOFT (orthogonal finetuning: a rotation of the weight, not an added delta)"),
    ("w_norm", "LyCORIS norm-layer training (`w_norm`/`b_norm`: GroupNorm and LayerNorm weights)"),
    ("b_norm", "LyCORIS norm-layer training (`w_norm`/`b_norm`: GroupNorm and LayerNorm weights)"),
    ("lokr_t1", "a LoKr Tucker core on the first half (`lokr_t1`), which LyCORIS never writes"),
];

/// A key's format family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyStyle {
    Kohya,
    Diffusers,
    Peft,
}

/// Why a key could not be parsed, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// An adapter type this tool does not apply (it must not be silently skipped).
    Unsupported(&'static str),
    /// Not a LoRA tensor name at all.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub component: Component,
    pub module: ModuleName,
    pub role: Role,
    pub style: KeyStyle,
}

/// Parses one tensor name.
pub fn parse_key(key: &str) -> Result<ParsedKey, KeyProblem> {
    if let Some(rest) = key.strip_prefix("lora_") {
        return parse_kohya(rest);
    }
    parse_dotted(key)
}

fn parse_kohya(rest: &str) -> Result<ParsedKey, KeyProblem> {
    let (component, flat_and_suffix) = if let Some(r) = rest.strip_prefix("unet_") {
        (Component::Unet, r)
    } else if let Some(r) = rest.strip_prefix("te1_") {
        (Component::TextEncoder, r)
    } else if let Some(r) = rest.strip_prefix("te2_") {
        (Component::TextEncoder2, r)
    } else if let Some(r) = rest.strip_prefix("te_") {
        (Component::TextEncoder, r)
    } else {
        return Err(KeyProblem::Unknown);
    };
    let (flat, suffix) = flat_and_suffix.split_once('.').ok_or(KeyProblem::Unknown)?;
    if let Some((_, what)) = REFUSED.iter().find(|(s, _)| *s == suffix) {
        return Err(KeyProblem::Unsupported(what));
    }
    // IA³ writes its scales as `<module>.weight`, which no other kohya-named tensor is.
    if suffix == "weight" {
        return Err(KeyProblem::Unsupported(REFUSED[0].1));
    }
    let role = KOHYA_SUFFIXES.iter().find(|(s, _)| *s == suffix).map(|(_, r)| *r).ok_or(KeyProblem::Unknown)?;
    if flat.is_empty() {
        return Err(KeyProblem::Unknown);
    }
    Ok(ParsedKey { component, module: ModuleName::Flat(flat.to_string()), role, style: KeyStyle::Kohya })
}

fn parse_dotted(key: &str) -> Result<ParsedKey, KeyProblem> {
    // Role suffixes, longest first.
    let suffixes: [(&str, Role, KeyStyle); 16] = [
        (".lora_linear_layer.down.weight", Role::Down, KeyStyle::Diffusers),
        (".lora_linear_layer.up.weight", Role::Up, KeyStyle::Diffusers),
        (".lora.down.weight", Role::Down, KeyStyle::Diffusers),
        (".lora.up.weight", Role::Up, KeyStyle::Diffusers),
        ("_lora.down.weight", Role::Down, KeyStyle::Diffusers),
        ("_lora.up.weight", Role::Up, KeyStyle::Diffusers),
        (".lora_A.default.weight", Role::Down, KeyStyle::Peft),
        (".lora_B.default.weight", Role::Up, KeyStyle::Peft),
        (".lora_A.weight", Role::Down, KeyStyle::Peft),
        (".lora_B.weight", Role::Up, KeyStyle::Peft),
        (".alpha", Role::Alpha, KeyStyle::Diffusers),
        (".lora.alpha", Role::Alpha, KeyStyle::Diffusers),
        // DoRA's magnitude: PEFT saves it without `.weight` (and loads both).
        (".lora_magnitude_vector.default.weight", Role::Magnitude, KeyStyle::Peft),
        (".lora_magnitude_vector.weight", Role::Magnitude, KeyStyle::Peft),
        (".lora_magnitude_vector.default", Role::Magnitude, KeyStyle::Peft),
        (".lora_magnitude_vector", Role::Magnitude, KeyStyle::Peft),
    ];
    let Some((path, role, style)) = suffixes.iter().find_map(|(s, r, st)| key.strip_suffix(s).map(|p| (p, *r, *st))) else {
        return Err(dotted_lycoris(key));
    };
    let path = path.strip_suffix(".lora").unwrap_or(path);
    let mut path = path.strip_prefix("base_model.model.").unwrap_or(path).to_string();
    let component = if let Some(r) = path.strip_prefix("unet.") {
        let r = r.to_string();
        path = r;
        Component::Unet
    } else if let Some(r) = path.strip_prefix("text_encoder_2.") {
        let r = r.to_string();
        path = r;
        Component::TextEncoder2
    } else if let Some(r) = path.strip_prefix("text_encoder.") {
        let r = r.to_string();
        path = r;
        Component::TextEncoder
    } else if path.starts_with("text_model.") {
        Component::TextEncoder
    } else if ["down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding."]
        .iter()
        .any(|p| path.starts_with(p))
    {
        Component::Unet
    } else {
        return Err(KeyProblem::Unknown);
    };
    // Old attention-processor keys: `attn1.processor.to_q_lora.down.weight`.
    if path.contains(".processor.") {
        path = path.replace(".processor.", ".");
        if path.ends_with(".to_out") {
            path.push_str(".0");
        }
    }
    if path.is_empty() {
        return Err(KeyProblem::Unknown);
    }
    Ok(ParsedKey { component, module: ModuleName::Dotted(path), role, style })
}

/// Why a dotted key that is no LoRA tensor was not taken: LyCORIS tensors after a dotted
/// (PEFT or diffusers) module path are named as such, since their layouts are only known in
/// kohya/LyCORIS naming.
fn dotted_lycoris(key: &str) -> KeyProblem {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = if last == "weight" || last == "default" { key.rsplit('.').nth(1).unwrap_or(last) } else { last };
    if last.starts_with("hada_") {
        KeyProblem::Unsupported("LyCORIS LoHa in a dotted (PEFT/diffusers) naming; loragate applies LoHa in kohya/LyCORIS naming (`lora_unet_<module>.hada_w1_a`)")
    } else if last.starts_with("lokr_") {
        KeyProblem::Unsupported("LyCORIS LoKr in a dotted (PEFT/diffusers) naming; loragate applies LoKr in kohya/LyCORIS naming (`lora_unet_<module>.lokr_w1`)")
    } else if let Some((_, what)) = REFUSED.iter().find(|(s, _)| key.ends_with(&format!(".{s}"))) {
        KeyProblem::Unsupported(what)
    } else {
        KeyProblem::Unknown
    }
}

/// The kohya flattening of a dotted module path.
pub fn flatten(path: &str) -> String {
    path.replace('.', "_")
}

/// Writes a module's key in a format, for exporters and round-trip tests. Diffusers and PEFT
/// names exist for plain LoRA and DoRA tensors; the LyCORIS algorithms are written in kohya
/// naming only, as LyCORIS writes them.
pub fn format_key(style: KeyStyle, component: Component, path: &str, role: Role) -> String {
    match style {
        KeyStyle::Kohya => {
            let c = match component {
                Component::Unet => "unet",
                Component::TextEncoder => "te",
                Component::TextEncoder2 => "te2",
            };
            format!("lora_{c}_{}.{}", flatten(path), role.kohya_suffix())
        }
        KeyStyle::Diffusers => {
            let suffix = match role {
                Role::Down => "lora.down.weight",
                Role::Up => "lora.up.weight",
                Role::Magnitude => "lora_magnitude_vector",
                other => other.kohya_suffix(),
            };
            format!("{}.{path}.{suffix}", component.prefix())
        }
        KeyStyle::Peft => {
            let suffix = match role {
                Role::Down => "lora_A.weight",
                Role::Up => "lora_B.weight",
                Role::Magnitude => "lora_magnitude_vector",
                other => other.kohya_suffix(),
            };
            format!("{}.{path}.{suffix}", component.prefix())
        }
    }
}
