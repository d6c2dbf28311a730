//! Embeddings of every generated image, every scored text and every reference image, computed
//! once in batches so that checks only take dot products: CLIP for text–image scores, the
//! identity scorer (CLIP or DINOv2) for identity, and the aesthetic predictor's scores.

use std::collections::HashMap;
use std::path::PathBuf;

use image::RgbImage;

use super::cache::ImageCache;
use super::generate::JobOutcome;
use crate::error::Result;
use crate::fsutil::content_hash;
use crate::imageio::read_image;
use crate::model::aesthetic::AestheticModel;
use crate::model::clip::ClipModel;
use crate::model::runtime::ImageEncoder;

/// The models a run scores with.
pub struct Scorers<'a> {
    /// Text–image scores.
    pub text: &'a ClipModel,
    /// Identity embeddings; `None`: the text scorer's image embeddings.
    pub identity: Option<&'a ImageEncoder>,
    /// The aesthetic predictor and its CLIP model (`None`: the text scorer).
    pub aesthetic: Option<(&'a AestheticModel, Option<&'a ClipModel>)>,
}

pub struct Embeddings {
    /// Per job, the text scorer's image embedding; `None` for jobs without an image.
    pub images: Vec<Option<Vec<f32>>>,
    /// Per job, the identity scorer's embedding, when it is another model than the text scorer.
    identity_images: Option<Vec<Option<Vec<f32>>>>,
    pub texts: HashMap<String, Vec<f32>>,
    /// Reference images in the identity scorer's space.
    pub references: HashMap<PathBuf, Vec<f32>>,
    /// Per job, the aesthetic score (when the suite has the check).
    pub aesthetic: Vec<Option<f64>>,
    pub warnings: Vec<String>,
}

impl Embeddings {
    pub fn text_score(&self, job: usize, text: &str) -> Option<f64> {
        Some(dot(self.images[job].as_ref()?, self.texts.get(text)?))
    }

    /// A job's embedding in the identity scorer's space.
    pub fn identity(&self, job: usize) -> Option<&Vec<f32>> {
        self.identity_images.as_ref().unwrap_or(&self.images)[job].as_ref()
    }

    /// Identity similarity of two jobs' images.
    pub fn image_image(&self, a: usize, b: usize) -> Option<f64> {
        Some(dot(self.identity(a)?, self.identity(b)?))
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum()
}

/// A cached embedding, if it is one: every scorer's embeddings are unit vectors, so a damaged
/// file (truncated, overwritten) is a miss rather than a wrong score.
fn cached(cache: &ImageCache, space: &str, key: &str) -> Option<Vec<f32>> {
    cache.get_vector(space, key).filter(|v| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() - 1.0).abs() < 1e-3)
}

/// Embeds every image with `embed`, or takes its embedding from the cache (by image key and
/// the scorer's `space`): images of one size together, in batches (each scorer resizes to its
/// own input size). An unchanged re-run embeds nothing.
fn embed_images(
    outcomes: &[JobOutcome],
    cache: &ImageCache,
    space: &str,
    progress: &crate::progress::Progress,
    embed: impl Fn(&[RgbImage]) -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Option<Vec<f32>>>> {
    const BATCH: usize = 32;
    let mut images: Vec<Option<Vec<f32>>> = vec![None; outcomes.len()];
    let mut by_size: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
    for (i, o) in outcomes.iter().enumerate() {
        let Some(img) = &o.image else { continue };
        match cached(cache, space, &o.key) {
            Some(v) => {
                images[i] = Some(v);
                progress.inc(1);
            }
            None => by_size.entry(img.dimensions()).or_default().push(i),
        }
    }
    let mut sizes: Vec<_> = by_size.into_iter().collect();
    sizes.sort();
    for (_, ids) in sizes {
        for chunk in ids.chunks(BATCH) {
            let batch: Vec<RgbImage> = chunk.iter().map(|&i| outcomes[i].image.clone().expect("filtered")).collect();
            for (&i, e) in chunk.iter().zip(embed(&batch)?) {
                cache.put_vector(space, &outcomes[i].key, &e)?;
                images[i] = Some(e);
            }
            progress.inc(chunk.len() as u64);
        }
    }
    Ok(images)
}

impl Scorers<'_> {
    /// How many of its models have read their weights (an unchanged re-run, all of whose
    /// embeddings and scores are cached, reads none).
    pub fn loaded(&self) -> usize {
        let aesthetic = self.aesthetic.map_or(0, |(p, clip)| p.weights_loaded() as usize + clip.is_some_and(|c| c.weights_loaded()) as usize);
        self.text.weights_loaded() as usize + self.identity.is_some_and(|m| m.weights_loaded()) as usize + aesthetic
    }
}

/// How many passes over the images [`embed_all`] makes (for the progress bar).
pub fn passes(scorers: &Scorers) -> u64 {
    1 + scorers.identity.is_some() as u64 + scorers.aesthetic.is_some_and(|(_, clip)| clip.is_some()) as u64
}

/// Embeds everything the checks need.
pub fn embed_all(
    scorers: &Scorers,
    cache: &ImageCache,
    outcomes: &[JobOutcome],
    texts: &[String],
    references: &[PathBuf],
    progress: &crate::progress::Progress,
) -> Result<Embeddings> {
    let text_space = scorers.text.embedding_space()?;
    let images = embed_images(outcomes, cache, &text_space, progress, |b| scorers.text.image_embedding_rows(b))?;
    let identity_images = match scorers.identity {
        Some(m) => Some(embed_images(outcomes, cache, &m.embedding_space()?, progress, |b| m.image_embedding_rows(b))?),
        None => None,
    };

    let mut unique: Vec<&str> = texts.iter().map(String::as_str).collect();
    unique.sort_unstable();
    unique.dedup();
    let mut text_map = HashMap::new();
    let text_key = |t: &str| content_hash(format!("text|{t}").as_bytes());
    let mut missing = Vec::new();
    for t in unique {
        match cached(cache, &text_space, &text_key(t)) {
            Some(v) => {
                scorers.text.note_cuts(t);
                text_map.insert(t.to_string(), v);
            }
            None => missing.push(t),
        }
    }
    for chunk in missing.chunks(32) {
        for (t, e) in chunk.iter().zip(scorers.text.text_embedding_rows(chunk)?) {
            cache.put_vector(&text_space, &text_key(t), &e)?;
            text_map.insert(t.to_string(), e);
        }
    }

    // References by pixel content, as accepted and training images are: a re-run embeds none.
    // A reference that no longer decodes (it did when the suite was checked) stops the run.
    let mut unique: Vec<(PathBuf, PathBuf)> = references.iter().map(|r| (r.clone(), r.clone())).collect();
    unique.sort();
    unique.dedup();
    let mut unreadable = Vec::new();
    let ref_map = embed_files(scorers, cache, &unique, "reference image", "the identity checks", &mut unreadable)?;
    if let Some(why) = unreadable.into_iter().next() {
        return Err(crate::error::Error::invalid(why));
    }

    let aesthetic = match scorers.aesthetic {
        None => vec![None; outcomes.len()],
        Some((predictor, clip)) => {
            let own;
            let (rows, clip_space) = match clip {
                Some(c) => {
                    let space = c.embedding_space()?;
                    own = embed_images(outcomes, cache, &space, progress, |b| c.image_embedding_rows(b))?;
                    (&own, space)
                }
                None => (&images, text_space.clone()),
            };
            // Scores are cached by image under the predictor and its CLIP model, one value each.
            let space = format!("aesthetic {} on {clip_space}", predictor.fingerprint()?);
            let mut out = vec![None; outcomes.len()];
            let mut todo = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                if row.is_none() {
                    continue;
                }
                match cache.get_vector(&space, &outcomes[i].key).as_deref() {
                    Some(&[s]) if s.is_finite() => out[i] = Some(s as f64),
                    _ => todo.push(i),
                }
            }
            let embeddings: Vec<Vec<f32>> = todo.iter().map(|&i| rows[i].clone().expect("present")).collect();
            for (i, s) in todo.into_iter().zip(predictor.scores(&embeddings)?) {
                cache.put_vector(&space, &outcomes[i].key, &[s as f32])?;
                out[i] = Some(s);
            }
            out
        }
    };
    let warnings = scorers.text.take_warnings();
    Ok(Embeddings { images, identity_images, texts: text_map, references: ref_map, aesthetic, warnings })
}

/// Identity embeddings of the accepted baseline images (for the reference-free identity check),
/// keyed as given; cached by pixel content like generated images. An accepted image that does
/// not decode is left out with a note (its own `baseline` check fails and names it).
pub fn embed_accepted<K: Clone + Eq + std::hash::Hash>(
    scorers: &Scorers,
    cache: &ImageCache,
    files: &[(K, PathBuf)],
    notes: &mut Vec<String>,
) -> Result<HashMap<K, Vec<f32>>> {
    embed_files(scorers, cache, files, "accepted image", "the likeness check", notes)
}

/// Identity embeddings of image files (accepted images, a LoRA's training images), keyed as
/// given and cached by pixel content. A file that does not decode is left out with a note
/// naming `what` it was and the check it is `left_out_of`.
pub fn embed_files<K: Clone + Eq + std::hash::Hash>(
    scorers: &Scorers,
    cache: &ImageCache,
    files: &[(K, PathBuf)],
    what: &str,
    left_out_of: &str,
    notes: &mut Vec<String>,
) -> Result<HashMap<K, Vec<f32>>> {
    let space = match scorers.identity {
        Some(m) => m.embedding_space()?,
        None => scorers.text.embedding_space()?,
    };
    let mut out = HashMap::new();
    // By size (each scorer resizes to its own input): the key, the cache key, the image.
    type Todo<K> = Vec<(K, String, RgbImage)>;
    let mut todo: HashMap<(u32, u32), Todo<K>> = HashMap::new();
    for (k, path) in files {
        let img = match read_image(path) {
            Ok(i) => i,
            Err(e) => {
                notes.push(format!("{what} {} left out of {left_out_of}: {e}", path.display()));
                continue;
            }
        };
        // By pixels alone: an accepted image and a training image with the same pixels share it.
        let key = format!("accepted|{}", crate::baseline::pixel_hash(&img));
        match cached(cache, &space, &key) {
            Some(v) => {
                out.insert(k.clone(), v);
            }
            None => todo.entry(img.dimensions()).or_default().push((k.clone(), key, img)),
        }
    }
    for (_, items) in todo {
        for chunk in items.chunks(32) {
            let batch: Vec<RgbImage> = chunk.iter().map(|(_, _, i)| i.clone()).collect();
            let rows = match scorers.identity {
                Some(m) => m.image_embedding_rows(&batch)?,
                None => scorers.text.image_embedding_rows(&batch)?,
            };
            for ((k, key, _), e) in chunk.iter().zip(rows) {
                cache.put_vector(&space, key, &e)?;
                out.insert(k.clone(), e);
            }
        }
    }
    Ok(out)
}

/// A LoRA's training images for the memorization check: every image of the folder (kohya
/// `N_name` folders included), embedded by the identity scorer and hashed. `Err`: why the
/// folder gave no image to compare with.
pub fn training_images(
    scorers: &Scorers,
    cache: &ImageCache,
    dir: &std::path::Path,
    origin: &str,
    notes: &mut Vec<String>,
) -> Result<std::result::Result<super::measure::TrainingImages, String>> {
    let scan = match crate::train::dataset::scan(dir) {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("the training set ({origin}) cannot be read: {e}"))),
    };
    let files: Vec<(String, PathBuf)> = scan.images.iter().map(|f| (f.rel.clone(), f.path.clone())).collect();
    let embedded = embed_files(scorers, cache, &files, "training image", "the memorization check", notes)?;
    let mut images = Vec::with_capacity(files.len());
    for (rel, path) in &files {
        // Files that did not decode were left out (with a note) by the embedding.
        let (Some(e), Ok(img)) = (embedded.get(rel), read_image(path)) else { continue };
        images.push((rel.clone(), e.clone(), crate::score::phash::PerceptualHash::of(&img)));
    }
    if images.is_empty() {
        return Ok(Err(format!("the training set {} ({origin}) has no readable image", dir.display())));
    }
    Ok(Ok(super::measure::TrainingImages { dir: dir.to_path_buf(), origin: origin.to_string(), images }))
}

/// Which model measured what. Every check result names its scorer (JUnit, the report), and
/// score baselines keep the scorer of every metric with its content fingerprint, so numbers
/// of another model are never compared.
#[derive(Debug, Clone, PartialEq)]
pub struct ScorerNames {
    /// As the suite wrote them: the CLIP scorer, the identity scorer, the aesthetic predictor.
    pub text: String,
    pub identity: String,
    pub aesthetic: Option<String>,
    /// Per score-baseline metric (`clip`, `identity`, ...), the scorer and its fingerprint.
    pub ids: std::collections::BTreeMap<String, String>,
    /// One line for the score baselines' `scorer`: the text scorer's id, then any other scorer.
    pub combined: String,
}

/// What checks measured with their own eyes rather than a model.
pub const PIXELS: &str = "pixels";

impl ScorerNames {
    pub fn of(suite: &crate::suite::Suite, scorers: &Scorers) -> Result<Self> {
        use crate::baseline::scores::Metric;
        let short = |fp: String| fp.chars().take(16).collect::<String>();
        let text = suite.scorer.0.clone();
        let text_id = format!("{text} {}", short(scorers.text.fingerprint()?));
        let (identity, identity_id) = match (&suite.identity_scorer, scorers.identity) {
            (Some((arg, _)), Some(m)) => {
                let kind = if matches!(m, ImageEncoder::Dinov2(_)) { "DINOv2" } else { "CLIP" };
                (format!("{arg} ({kind})"), format!("{arg} {}", short(m.fingerprint()?)))
            }
            _ => (text.clone(), text_id.clone()),
        };
        let (aesthetic, aesthetic_id) = match (&suite.aesthetic, scorers.aesthetic) {
            (Some(spec), Some((p, _))) => {
                let file = spec.predictor.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                (Some(format!("{file} on {}", spec.clip.0)), Some(format!("{file} {} on {}", short(p.fingerprint()?), spec.clip.0)))
            }
            _ => (None, None),
        };
        let mut combined = text_id.clone();
        if identity_id != text_id {
            combined.push_str(&format!(" · identity {identity_id}"));
        }
        if let Some(a) = &aesthetic_id {
            combined.push_str(&format!(" · aesthetic {a}"));
        }
        let ids = Metric::ALL
            .iter()
            .filter_map(|m| {
                let id = match m {
                    Metric::Clip => text_id.clone(),
                    Metric::Identity => identity_id.clone(),
                    // Never stored: measured against the accepted images on every run.
                    Metric::Likeness => return None,
                    Metric::Aesthetic => aesthetic_id.clone()?,
                    Metric::WordOrder | Metric::Effect | Metric::Leak | Metric::Diversity => PIXELS.to_string(),
                };
                Some((m.name().to_string(), id))
            })
            .collect();
        Ok(ScorerNames { text, identity, aesthetic, ids, combined })
    }

    /// The scorer a check's numbers come from, by the check's kind.
    pub fn of_check(&self, check: &str) -> String {
        match check.split(['/', '@']).next().unwrap_or(check) {
            "clip" | "per-seed" | "control" | "sweep" | "bisect" | "misses" => self.text.clone(),
            "identity" | "identity-group" => self.identity.clone(),
            "aesthetic" => self.aesthetic.clone().unwrap_or_default(),
            "stack" => format!("{PIXELS}; look: {}", self.identity),
            "effect" | "leak" | "word-order" | "diversity" | "baseline" | "sweep-zero" | "sanity" => PIXELS.to_string(),
            // The nearest training image by the identity scorer and by perceptual hash.
            "memorization" => format!("{}, {PIXELS}", self.identity),
            "regression" | "slice" => {
                let mut all = vec![self.text.clone()];
                all.extend([self.identity.clone()].into_iter().chain(self.aesthetic.clone()).filter(|s| *s != self.text));
                all.push(PIXELS.into());
                all.join(", ")
            }
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_names_the_scorer_its_numbers_come_from() {
        let names = ScorerNames {
            text: "tiny-clip".into(),
            identity: "dinov2-base (DINOv2)".into(),
            aesthetic: Some("laion.safetensors on clip-l".into()),
            ids: Default::default(),
            combined: String::new(),
        };
        for (check, want) in [
            ("clip", "tiny-clip"),
            ("clip@192x192", "tiny-clip"),
            ("control", "tiny-clip"),
            ("per-seed", "tiny-clip"),
            ("sweep", "tiny-clip"),
            ("bisect", "tiny-clip"),
            ("identity", "dinov2-base (DINOv2)"),
            ("identity-group/zorb", "dinov2-base (DINOv2)"),
            ("aesthetic", "laion.safetensors on clip-l"),
            ("stack", "pixels; look: dinov2-base (DINOv2)"),
            ("effect", "pixels"),
            ("word-order", "pixels"),
            ("baseline", "pixels"),
            ("regression", "tiny-clip, dinov2-base (DINOv2), laion.safetensors on clip-l, pixels"),
            ("slice", "tiny-clip, dinov2-base (DINOv2), laion.safetensors on clip-l, pixels"),
            ("identity/accepted", "dinov2-base (DINOv2)"),
            ("misses", "tiny-clip"),
            ("memorization/zorb", "dinov2-base (DINOv2), pixels"),
            ("applied@tiny", ""),
            ("images", ""),
        ] {
            assert_eq!(names.of_check(check), want, "{check}");
        }
        // Every check kind a suite can name is mapped (a new kind must say its scorer).
        for kind in crate::suite::CHECK_KINDS {
            let known = ["applied", "images"].contains(kind) || !names.of_check(kind).is_empty();
            assert!(known, "check kind `{kind}` names no scorer");
        }
    }
}
