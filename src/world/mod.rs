//! The shapes world: a procedural image domain with known ground truth, ported from the
//! reference `world.py` of the tiny models (see `shared/tinyworld/README.md`).
//!
//! One object per image: a coloured shape (or a concept such as `zorb`) of some size at some
//! position on a background, in a plain or `sticker` style. Captions are comma-separated tags
//! in random order. Everything is deterministic from a seed (the crate's own [`Rng`]); the RNG
//! streams are not those of the PyTorch reference, and anti-aliasing may differ slightly.

pub mod attributes;
pub mod caption;
pub mod dataset;
pub mod render;

pub use attributes::{
    Attributes, Background, CLASHES, Color, Concept, Position, Shape, Size, all_combinations, clashes,
    sample_attributes,
};
pub use caption::{PartialAttributes, TagKind, caption, full_caption, subject, tag, vocabulary};
pub use dataset::{DatasetSpec, Mislabel, Sample};
pub use render::{DEFAULT_RESOLUTION, Placement, RenderOptions, Style, render, render_batch, render_placed, sdf};

use image::RgbImage;

use crate::error::{Error, Result};
use crate::model::noise::Rng;

/// The attributes a prompt asks for, the rest drawn from `seed`. Tags outside the world's
/// vocabulary are an error (their ground truth is undefined).
pub fn prompt_attributes(prompt: &str, seed: u64) -> Result<Attributes> {
    let (a, _) = resolve(prompt, seed)?;
    Ok(a)
}

/// Renders the ground-truth image for a prompt: the attributes its tags state, the others and
/// the placement jitter drawn from `seed`. Returns the attributes drawn, too.
pub fn render_prompt(prompt: &str, seed: u64, options: &RenderOptions) -> Result<(Attributes, RgbImage)> {
    let (a, mut rng) = resolve(prompt, seed)?;
    Ok((a, render(&a, options, &mut rng)))
}

fn resolve(prompt: &str, seed: u64) -> Result<(Attributes, Rng)> {
    let partial = PartialAttributes::parse(prompt)?;
    if !partial.unknown.is_empty() {
        let tags = partial.unknown.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", ");
        let verb = if partial.unknown.len() == 1 { "is not a shapes-world tag" } else { "are not shapes-world tags" };
        return Err(Error::invalid(format!(
            "prompt {prompt:?}: {tags} {verb}; tags are \"{{colour}} {{shape}}\" or a concept ({}), \
             small|large, in the center|on the left|on the right|at the top|at the bottom, \"{{background}} background\"",
            Concept::known_names()
        )));
    }
    let mut rng = Rng::new(seed);
    let a = partial.complete(&mut rng, Shape::BASIC);
    Ok((a, rng))
}
