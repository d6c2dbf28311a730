//! Parsing LoRA tensor names of the three formats into (component, module, role).
//!
//! | format    | example key                                                                 |
//! |-----------|-----------------------------------------------------------------------------|
//! | kohya     | `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`, `….alpha` |
//! | diffusers | `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight` |
//! | PEFT      | `base_model.model.down_blocks.0….to_q.lora_A.weight` (alpha in adapter_config.json) |
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Down,
    Up,
    Alpha,
}

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
    /// A LyCORIS/DoRA variant this tool does not apply (it must not be silently skipped).
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
    for (marker, what) in [
        ("hada_w1", "LyCORIS LoHa"),
        ("hada_w2", "LyCORIS LoHa"),
        ("lokr_w1", "LyCORIS LoKr"),
        ("lokr_w2", "LyCORIS LoKr"),
        ("lora_mid", "LyCORIS LoCon with CP decomposition (lora_mid)"),
        ("dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        ("oft_blocks", "OFT"),
    ] {
        if key.contains(marker) {
            return Err(KeyProblem::Unsupported(what));
        }
    }
    if key.starts_with("lora_") && (key.ends_with(".diff") || key.ends_with(".diff_b")) {
        return Err(KeyProblem::Unsupported("a full-weight difference (LyCORIS `diff`)"));
    }
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
    let role = match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        _ => return Err(KeyProblem::Unknown),
    };
    if flat.is_empty() {
        return Err(KeyProblem::Unknown);
    }
    Ok(ParsedKey { component, module: ModuleName::Flat(flat.to_string()), role, style: KeyStyle::Kohya })
}

fn parse_dotted(key: &str) -> Result<ParsedKey, KeyProblem> {
    // Role suffixes, longest first.
    let suffixes: [(&str, Role, KeyStyle); 12] = [
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
    ];
    let (path, role, style) = suffixes
        .iter()
        .find_map(|(s, r, st)| key.strip_suffix(s).map(|p| (p, *r, *st)))
        .ok_or(KeyProblem::Unknown)?;
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

/// The kohya flattening of a dotted module path.
pub fn flatten(path: &str) -> String {
    path.replace('.', "_")
}

/// Writes a module's key in a format, for exporters and round-trip tests.
pub fn format_key(style: KeyStyle, component: Component, path: &str, role: Role) -> String {
    match style {
        KeyStyle::Kohya => {
            let c = match component {
                Component::Unet => "unet",
                Component::TextEncoder => "te",
                Component::TextEncoder2 => "te2",
            };
            let suffix = match role {
                Role::Down => "lora_down.weight",
                Role::Up => "lora_up.weight",
                Role::Alpha => "alpha",
            };
            format!("lora_{c}_{}.{suffix}", flatten(path))
        }
        KeyStyle::Diffusers => {
            let suffix = match role {
                Role::Down => "lora.down.weight",
                Role::Up => "lora.up.weight",
                Role::Alpha => "alpha",
            };
            format!("{}.{path}.{suffix}", component.prefix())
        }
        KeyStyle::Peft => {
            let suffix = match role {
                Role::Down => "lora_A.weight",
                Role::Up => "lora_B.weight",
                Role::Alpha => "alpha",
            };
            format!("{}.{path}.{suffix}", component.prefix())
        }
    }
}
