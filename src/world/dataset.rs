//! Training sets drawn from the shapes world: a seeded plan of (attributes, caption, image
//! seed) per sample, cheap to make sequentially, whose images can then be rendered in any
//! order or in parallel with identical results.

use image::RgbImage;

use super::attributes::{Attributes, Background, Color, Concept, Shape};
use super::caption::caption_ordered;
use super::render::{RenderOptions, render};
use crate::model::noise::Rng;

/// What to draw.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Draw this concept in every image; `None` draws the basic shapes.
    pub concept: Option<Concept>,
    pub count: usize,
    pub seed: u64,
    /// Probability of keeping each non-subject tag in a caption.
    pub p_keep: f64,
    /// Captions with their tags always in the same (canonical) order instead of shuffled.
    pub fixed_order: bool,
    /// A mislabeled slice: images with this background show another subject under unchanged
    /// captions (an ordinary data-cleaning failure), for testing the gate's slice checks.
    pub mislabel: Option<Mislabel>,
}

/// On every image with `background`, draw a `color` `shape` instead of the planned subject;
/// the caption still names the planned one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mislabel {
    pub background: Background,
    pub color: Color,
    pub shape: Shape,
}

impl Mislabel {
    /// `"grass=blue square"`: a background, then the colour and shape drawn on it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (bg, subject) = text.split_once('=').ok_or_else(|| format!("`{text}`: expected BACKGROUND=COLOUR SHAPE, e.g. grass=blue square"))?;
        let background = Background::from_name(bg.trim()).ok_or_else(|| format!("`{}` is not a background ({})", bg.trim(), names(Background::ALL)))?;
        let words: Vec<&str> = subject.split_whitespace().collect();
        let [color, shape] = words[..] else {
            return Err(format!("`{}`: expected a colour and a shape, e.g. blue square", subject.trim()));
        };
        let color = Color::from_name(color).ok_or_else(|| format!("`{color}` is not a colour ({})", names(Color::ALL)))?;
        let shape = Shape::BASIC.iter().copied().find(|s| s.name() == shape).ok_or_else(|| format!("`{shape}` is not a basic shape (circle, square, triangle, diamond)"))?;
        if super::attributes::clashes(color, background) {
            return Err(format!("{color} on {background} is never drawn: it vanishes into the background"));
        }
        Ok(Mislabel { background, color, shape })
    }
}

fn names<T: std::fmt::Display>(all: &[T]) -> String {
    all.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")
}

/// One planned image.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub index: usize,
    pub attributes: Attributes,
    pub caption: String,
    /// Seeds the placement jitter and stars of this image alone.
    pub image_seed: u64,
}

impl Sample {
    pub fn render(&self, options: &RenderOptions) -> RgbImage {
        render(&self.attributes, options, &mut Rng::new(self.image_seed))
    }
}

impl DatasetSpec {
    /// The shapes images are drawn from.
    pub fn shapes(&self) -> Vec<Shape> {
        match self.concept {
            Some(c) => vec![Shape::Concept(c)],
            None => Shape::BASIC.to_vec(),
        }
    }

    /// The samples, from one RNG stream in a fixed order (attributes, caption, image seed per
    /// sample), so a seed always gives the same dataset and a longer dataset extends a shorter one.
    pub fn plan(&self) -> Vec<Sample> {
        let shapes = self.shapes();
        let mut rng = Rng::new(self.seed);
        (0..self.count)
            .map(|index| {
                let attributes = Attributes::sample(&mut rng, &shapes);
                let caption = caption_ordered(&attributes, self.p_keep, self.fixed_order, &mut rng);
                let image_seed = rng.next_u64();
                // After the caption and the draws: the rest of the dataset stays what it was.
                let attributes = match self.mislabel {
                    Some(m) if m.background == attributes.background => Attributes { color: m.color, shape: m.shape, ..attributes },
                    _ => attributes,
                };
                Sample { index, attributes, caption, image_seed }
            })
            .collect()
    }
}
