//! Captions of the shapes world (comma-separated tags in random order, like the tag prompts
//! people write for anime LoRAs) and the way back: parsing a prompt's tags into the attributes
//! they state.

use super::attributes::{Attributes, Background, Color, Position, Shape, Size};
use crate::error::{Error, Result};
use crate::model::noise::Rng;

/// The four kinds of tag, for choosing the order of [`full_caption`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TagKind {
    /// `red circle`, or just `zorb` for a concept.
    Subject,
    /// `small` or `large`.
    Size,
    /// `in the center`, `on the left`, ...
    Position,
    /// `sky background`, ...
    Background,
}

impl TagKind {
    /// Subject, size, position, background: the order of the reference's `full_caption`.
    pub const CANONICAL: [TagKind; 4] = [TagKind::Subject, TagKind::Size, TagKind::Position, TagKind::Background];
}

/// The subject tag: `"{colour} {shape}"`, or the concept's name alone.
pub fn subject(a: &Attributes) -> String {
    match a.shape {
        Shape::Concept(c) => c.name().to_string(),
        s => format!("{} {}", a.color.name(), s.name()),
    }
}

/// The tag of one kind for `a`.
pub fn tag(a: &Attributes, kind: TagKind) -> String {
    match kind {
        TagKind::Subject => subject(a),
        TagKind::Size => a.size.name().to_string(),
        TagKind::Position => a.position.tag().to_string(),
        TagKind::Background => format!("{} background", a.background.name()),
    }
}

/// A training caption: the subject always, each other tag kept with probability `p_keep`,
/// then all tags shuffled.
pub fn caption(a: &Attributes, p_keep: f64, rng: &mut Rng) -> String {
    caption_ordered(a, p_keep, false, rng)
}

/// [`caption`], or with `fixed_order` the kept tags in [`TagKind::CANONICAL`] order (the
/// "always the same tag order" mistake). Both draw the same numbers from `rng`, so a dataset's
/// images do not depend on the order of its captions.
pub fn caption_ordered(a: &Attributes, p_keep: f64, fixed_order: bool, rng: &mut Rng) -> String {
    let mut tags = vec![TagKind::Subject];
    for kind in [TagKind::Size, TagKind::Position, TagKind::Background] {
        if rng.uniform() < p_keep {
            tags.push(kind);
        }
    }
    rng.shuffle(&mut tags);
    if fixed_order {
        tags.sort_by_key(|k| TagKind::CANONICAL.iter().position(|c| c == k));
    }
    tags.iter().map(|&k| tag(a, k)).collect::<Vec<_>>().join(", ")
}

/// The tags of the given kinds in the given order, joined by ", ".
pub fn full_caption(a: &Attributes, order: &[TagKind]) -> String {
    order.iter().map(|&k| tag(a, k)).collect::<Vec<_>>().join(", ")
}

/// Every word captions use, sorted (useful for checking a tokenizer's vocabulary).
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = Color::ALL.iter().map(|c| c.name()).collect();
    words.extend(Shape::BASIC.iter().map(|s| s.name()));
    words.extend(Background::ALL.iter().map(|b| b.name()));
    words.extend(Size::ALL.iter().map(|s| s.name()));
    words.extend(Position::ALL.iter().flat_map(|p| p.tag().split(' ')));
    words.push("background");
    words.sort_unstable();
    words.dedup();
    words
}

/// What a prompt states about the image; `None` where it says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartialAttributes {
    pub color: Option<Color>,
    pub shape: Option<Shape>,
    pub size: Option<Size>,
    pub position: Option<Position>,
    pub background: Option<Background>,
    /// Tags that are not part of the world's vocabulary, as written (trimmed).
    pub unknown: Vec<String>,
}

/// What a full caption of `a` states: everything, except the colour of a concept (concepts
/// bring their own colours and their captions do not name one).
impl From<&Attributes> for PartialAttributes {
    fn from(a: &Attributes) -> Self {
        PartialAttributes {
            color: if a.shape.concept().is_some() { None } else { Some(a.color) },
            shape: Some(a.shape),
            size: Some(a.size),
            position: Some(a.position),
            background: Some(a.background),
            unknown: Vec::new(),
        }
    }
}

impl Attributes {
    /// Parses a prompt's tags back into attributes; see [`PartialAttributes::parse`].
    pub fn parse_prompt(prompt: &str) -> Result<PartialAttributes> {
        PartialAttributes::parse(prompt)
    }
}

/// Records `value` in `slot`, refusing a second, different value for the same attribute.
fn set<T: Copy + PartialEq + std::fmt::Display>(slot: &mut Option<T>, value: T, what: &str) -> Result<()> {
    match *slot {
        Some(old) if old != value => Err(Error::invalid(format!(
            "the prompt names two {what}s, `{old}` and `{value}`; a world image has one object"
        ))),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

impl PartialAttributes {
    /// Parses comma-separated tags, case- and spacing-insensitively. Besides the caption tags
    /// it accepts a colour or a shape on its own (`red`, `circle`). Tags outside the world's
    /// vocabulary are collected in `unknown`; two different values for one attribute (`small,
    /// large`) are an error.
    pub fn parse(prompt: &str) -> Result<Self> {
        let mut out = PartialAttributes::default();
        for raw in prompt.split(',') {
            let words: Vec<String> = raw.split_whitespace().map(|w| w.to_lowercase()).collect();
            if words.is_empty() {
                continue; // "a, , b" and trailing commas
            }
            let text = words.join(" ");
            if !out.parse_tag(&words, &text)? {
                out.unknown.push(raw.trim().to_string());
            }
        }
        Ok(out)
    }

    /// Applies one normalised tag; `false` when it is not a world tag.
    fn parse_tag(&mut self, words: &[String], text: &str) -> Result<bool> {
        if let Some(shape) = Shape::from_name(text) {
            set(&mut self.shape, shape, "shape")?;
        } else if let Some(color) = Color::from_name(text) {
            set(&mut self.color, color, "colour")?;
        } else if let Some(size) = Size::from_name(text) {
            set(&mut self.size, size, "size")?;
        } else if let Some(&position) = Position::ALL.iter().find(|p| p.tag() == text) {
            set(&mut self.position, position, "position")?;
        } else if let [first, second] = words {
            if second == "background"
                && let Some(bg) = Background::from_name(first)
            {
                set(&mut self.background, bg, "background")?;
            } else if let (Some(color), Some(shape)) = (Color::from_name(first), Shape::from_name(second))
                && shape.concept().is_none()
            {
                set(&mut self.color, color, "colour")?;
                set(&mut self.shape, shape, "shape")?;
            } else {
                return Ok(false);
            }
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Whether every attribute that is drawn is stated (a concept needs no colour).
    pub fn is_complete(&self) -> bool {
        let color_needed = !matches!(self.shape, Some(Shape::Concept(_)));
        self.shape.is_some()
            && self.size.is_some()
            && self.position.is_some()
            && self.background.is_some()
            && (self.color.is_some() || !color_needed)
    }

    /// Fills what the prompt left open from `rng` (shapes from `shapes`, or the basic shapes
    /// when empty), avoiding colour/background clashes unless the prompt stated both.
    pub fn complete(&self, rng: &mut Rng, shapes: &[Shape]) -> Attributes {
        loop {
            // A full draw every time keeps the stream independent of which fields are given.
            let drawn = Attributes::sample(rng, shapes);
            let a = Attributes {
                color: self.color.unwrap_or(drawn.color),
                shape: self.shape.unwrap_or(drawn.shape),
                size: self.size.unwrap_or(drawn.size),
                position: self.position.unwrap_or(drawn.position),
                background: self.background.unwrap_or(drawn.background),
            };
            let stated_clash = self.color.is_some() && self.background.is_some();
            if stated_clash || !a.clashes() {
                return a;
            }
        }
    }
}
