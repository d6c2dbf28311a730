//! Training sets drawn from the shapes world: a seeded plan of (attributes, caption, image
//! seed) per sample, cheap to make sequentially, whose images can then be rendered in any
//! order or in parallel with identical results.

use image::RgbImage;

use super::attributes::{Attributes, Concept, Shape};
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
                Sample { index, attributes, caption, image_seed }
            })
            .collect()
    }
}
