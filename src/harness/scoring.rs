//! CLIP embeddings of every generated image, every scored text and every reference image,
//! computed once in batches so that checks only take dot products.

use std::collections::HashMap;
use std::path::PathBuf;

use image::RgbImage;

use super::generate::JobOutcome;
use crate::error::Result;
use crate::imageio::read_image;
use crate::model::clip::ClipModel;

pub struct Embeddings {
    /// Per job; `None` for jobs without an image.
    pub images: Vec<Option<Vec<f32>>>,
    pub texts: HashMap<String, Vec<f32>>,
    pub references: HashMap<PathBuf, Vec<f32>>,
    pub warnings: Vec<String>,
}

impl Embeddings {
    pub fn text_score(&self, job: usize, text: &str) -> Option<f64> {
        Some(dot(self.images[job].as_ref()?, self.texts.get(text)?))
    }

    pub fn image_image(&self, a: usize, b: usize) -> Option<f64> {
        Some(dot(self.images[a].as_ref()?, self.images[b].as_ref()?))
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum()
}

/// Embeds everything the checks need. Images of different sizes are embedded in separate
/// batches (the scorer resizes each to its own input size).
pub fn embed_all(
    scorer: &ClipModel,
    outcomes: &[JobOutcome],
    texts: &[String],
    references: &[PathBuf],
    progress: &crate::progress::Progress,
) -> Result<Embeddings> {
    const BATCH: usize = 32;
    let mut images: Vec<Option<Vec<f32>>> = vec![None; outcomes.len()];
    let mut by_size: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
    for (i, o) in outcomes.iter().enumerate() {
        if let Some(img) = &o.image {
            by_size.entry(img.dimensions()).or_default().push(i);
        }
    }
    let mut sizes: Vec<_> = by_size.into_iter().collect();
    sizes.sort();
    for (_, ids) in sizes {
        for chunk in ids.chunks(BATCH) {
            let batch: Vec<RgbImage> = chunk.iter().map(|&i| outcomes[i].image.clone().expect("filtered")).collect();
            for (&i, e) in chunk.iter().zip(scorer.image_embedding_rows(&batch)?) {
                images[i] = Some(e);
            }
            progress.inc(chunk.len() as u64);
        }
    }
    let mut unique: Vec<&str> = texts.iter().map(String::as_str).collect();
    unique.sort_unstable();
    unique.dedup();
    let mut text_map = HashMap::new();
    for chunk in unique.chunks(BATCH) {
        for (t, e) in chunk.iter().zip(scorer.text_embedding_rows(chunk)?) {
            text_map.insert(t.to_string(), e);
        }
    }
    let mut ref_map = HashMap::new();
    for r in references {
        if ref_map.contains_key(r) {
            continue;
        }
        let img = read_image(r)?;
        let e = scorer.image_embedding_rows(&[img])?.remove(0);
        ref_map.insert(r.clone(), e);
    }
    Ok(Embeddings { images, texts: text_map, references: ref_map, warnings: scorer.take_warnings() })
}
