//! Training data: finding images and captions in a folder (kohya's layout), resolution
//! buckets, and the order in which samples are drawn.
//!
//! Layout: images (`png`, `jpg`, `jpeg`, `webp`) with a same-name `.txt` caption, either
//! directly in the dataset folder (repeated once per epoch) or in sub-folders named
//! `N_name`, whose images are repeated N times per epoch (kohya's convention for balancing
//! concepts). Other sub-folders are reported and skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Error, IoContext, Result};
use crate::model::noise::Rng;

pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// One image file found in the dataset folder.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundImage {
    pub path: PathBuf,
    /// Path relative to the dataset folder, with `/` separators (for tables and hashes).
    pub rel: String,
    /// The `.txt` caption beside it, when there is one.
    pub caption_path: Option<PathBuf>,
    /// Epoch repeats from the `N_name` folder (1 at the top level).
    pub repeats: usize,
    /// The folder it came from (`.` for the top level).
    pub folder: String,
}

/// A folder that is not part of the dataset, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub rel: String,
    pub reason: String,
}

/// What a dataset folder holds, before any file is opened.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub root: PathBuf,
    pub images: Vec<FoundImage>,
    /// `.txt` files without an image.
    pub orphan_captions: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// Parses kohya's `N_name` folder names: `Some((N, name))`.
pub fn repeat_folder(name: &str) -> Option<(usize, &str)> {
    let (n, rest) = name.split_once('_')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).at(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// Lists a dataset folder (no file is decoded here).
pub fn scan(root: &Path) -> Result<Scan> {
    if !root.is_dir() {
        return Err(Error::invalid(format!("dataset folder {} does not exist or is not a folder", root.display())));
    }
    let mut scan = Scan { root: root.to_path_buf(), ..Default::default() };
    let mut folders: Vec<(PathBuf, usize, String)> = vec![(root.to_path_buf(), 1, ".".to_string())];
    for p in sorted_entries(root)? {
        if !p.is_dir() {
            continue;
        }
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        match repeat_folder(&name) {
            Some((0, _)) => scan.skipped.push(Skipped { rel: name, reason: "0 repeats: kohya skips such folders".into() }),
            Some((n, _)) => folders.push((p, n, name)),
            None => scan.skipped.push(Skipped {
                rel: name,
                reason: "not an `N_name` repeat folder (e.g. `10_zorb`), so its files are not used".into(),
            }),
        }
    }
    for (dir, repeats, folder) in folders {
        for p in sorted_entries(&dir)? {
            if !p.is_file() {
                continue;
            }
            let rel = if folder == "." {
                p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            } else {
                format!("{folder}/{}", p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            };
            if is_image(&p) {
                let cap = p.with_extension("txt");
                scan.images.push(FoundImage {
                    caption_path: cap.is_file().then_some(cap),
                    path: p,
                    rel,
                    repeats,
                    folder: folder.clone(),
                });
            } else if p.extension().is_some_and(|e| e == "txt") {
                let has_image = IMAGE_EXTENSIONS.iter().any(|e| {
                    p.with_extension(e).is_file() || p.with_extension(e.to_ascii_uppercase()).is_file()
                });
                if !has_image {
                    scan.orphan_captions.push(rel);
                }
            }
        }
    }
    Ok(scan)
}

/// An image ready for training: decoded, with its caption.
#[derive(Debug, Clone)]
pub struct TrainImage {
    pub rel: String,
    pub image: RgbImage,
    pub caption: String,
    pub repeats: usize,
    pub folder: String,
}

/// Reads a caption file, whole (as kohya does); line breaks and runs of spaces become single
/// spaces, so a multi-line caption reads as one prompt.
pub fn read_caption(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).at(path)?;
    Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The content identity of a dataset: every image's bytes, caption and repeats, in order.
pub fn dataset_hash(images: &[(String, String, String, usize)]) -> String {
    let mut text = String::new();
    for (rel, file_hash, caption, repeats) in images {
        text.push_str(&format!("{rel}\t{file_hash}\t{repeats}\t{caption}\n"));
    }
    crate::fsutil::content_hash(text.as_bytes())
}

/// The bucket sizes (width, height) for a target resolution: sides are multiples of `step`,
/// the area at most `resolution²`, the aspect ratio at most `max_aspect`.
pub fn buckets(resolution: usize, step: usize, max_aspect: f64) -> Vec<(usize, usize)> {
    let area = resolution * resolution;
    let mut out = Vec::new();
    let mut w = step;
    while w <= area / step {
        // The tallest height that keeps the area within the target.
        let h = (area / w) / step * step;
        if h >= step {
            let aspect = w.max(h) as f64 / w.min(h) as f64;
            if aspect <= max_aspect + 1e-9 {
                out.push((w, h));
            }
        }
        w += step;
    }
    out.sort();
    out.dedup();
    out
}

/// The bucket whose aspect ratio is closest to the image's (ties: the larger area).
pub fn bucket_for(width: u32, height: u32, buckets: &[(usize, usize)]) -> (usize, usize) {
    let a = (width.max(1) as f64 / height.max(1) as f64).ln();
    *buckets
        .iter()
        .min_by(|x, y| {
            let dx = ((x.0 as f64 / x.1 as f64).ln() - a).abs();
            let dy = ((y.0 as f64 / y.1 as f64).ln() - a).abs();
            dx.total_cmp(&dy).then((y.0 * y.1).cmp(&(x.0 * x.1)))
        })
        .expect("at least one bucket")
}

/// Scales an image to cover `(w, h)` and crops the centre.
pub fn fit_to_bucket(img: &RgbImage, (w, h): (usize, usize)) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if (iw as usize, ih as usize) == (w, h) {
        return img.clone();
    }
    let ((sw, sh), (x, y)) = bucket_crop((iw, ih), (w, h));
    let resized = image::imageops::resize(img, sw, sh, image::imageops::FilterType::CatmullRom);
    image::imageops::crop_imm(&resized, x, y, w as u32, h as u32).to_image()
}

/// How [`fit_to_bucket`] fits an image of `(iw, ih)` to a bucket: the size it is resized to
/// (covering the bucket) and the top-left corner `(x, y)` of the centred cut.
pub fn bucket_crop((iw, ih): (u32, u32), (w, h): (usize, usize)) -> ((u32, u32), (u32, u32)) {
    let scale = (w as f64 / iw as f64).max(h as f64 / ih as f64);
    let sw = ((iw as f64 * scale).round() as u32).max(w as u32);
    let sh = ((ih as f64 * scale).round() as u32).max(h as u32);
    ((sw, sh), ((sw - w as u32) / 2, (sh - h as u32) / 2))
}

/// One trainable sample: an image at one bucket size (an image appears once per training
/// resolution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    pub image: usize,
    pub bucket: (usize, usize),
}

/// Assigns every image a bucket at every resolution.
pub fn entries(images: &[TrainImage], resolutions: &[usize], step: usize, max_aspect: f64) -> Vec<Entry> {
    let mut out = Vec::new();
    for &r in resolutions {
        let b = buckets(r, step, max_aspect);
        for (i, img) in images.iter().enumerate() {
            out.push(Entry { image: i, bucket: bucket_for(img.image.width(), img.image.height(), &b) });
        }
    }
    out
}

/// Draws batches epoch by epoch: every entry `repeats` times per epoch, shuffled, grouped by
/// bucket into batches (the last batch of a bucket may be smaller), batches in random order.
pub struct BatchSampler {
    entries: Vec<Entry>,
    repeats: Vec<usize>,
    batch_size: usize,
    queue: Vec<Vec<Entry>>,
    pub epoch: usize,
}

impl BatchSampler {
    pub fn new(entries: Vec<Entry>, images: &[TrainImage], batch_size: usize) -> Self {
        let repeats = entries.iter().map(|e| images[e.image].repeats.max(1)).collect();
        BatchSampler { entries, repeats, batch_size: batch_size.max(1), queue: Vec::new(), epoch: 0 }
    }

    /// Samples per epoch (entries × repeats).
    pub fn epoch_len(&self) -> usize {
        self.repeats.iter().sum()
    }

    fn refill(&mut self, rng: &mut Rng) {
        let mut all: Vec<Entry> = Vec::with_capacity(self.epoch_len());
        for (e, &r) in self.entries.iter().zip(&self.repeats) {
            all.extend(std::iter::repeat_n(*e, r));
        }
        rng.shuffle(&mut all);
        let mut by_bucket: BTreeMap<(usize, usize), Vec<Entry>> = BTreeMap::new();
        for e in all {
            by_bucket.entry(e.bucket).or_default().push(e);
        }
        let mut batches: Vec<Vec<Entry>> = Vec::new();
        for (_, v) in by_bucket {
            batches.extend(v.chunks(self.batch_size).map(|c| c.to_vec()));
        }
        rng.shuffle(&mut batches);
        batches.reverse(); // popped from the end
        self.queue = batches;
        self.epoch += 1;
    }

    pub fn next_batch(&mut self, rng: &mut Rng) -> Vec<Entry> {
        if self.queue.is_empty() {
            self.refill(rng);
        }
        self.queue.pop().unwrap_or_default()
    }
}

/// Splits `n` images into (training, held-out) indices, each sorted: `round(fraction × n)`
/// images drawn by `seed` are held out. The same `n`, fraction and seed always give the same
/// split. Refused when either side would be empty.
pub fn split_heldout(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let held = (fraction * n as f64).round() as usize;
    if held == 0 {
        return Err(Error::invalid(format!(
            "validation_split {fraction} of {n} image(s) holds out none; raise the fraction (at least {:.3}) or give a folder of held-out images",
            0.5 / n.max(1) as f64
        )));
    }
    if held >= n {
        return Err(Error::invalid(format!(
            "validation_split {fraction} of {n} image(s) leaves no image to train on; lower the fraction or add images"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Its own stream: the split does not move when other uses of the seed change.
    Rng::new(seed ^ 0x5350_4c49_5421_0000).shuffle(&mut order);
    let mut heldout = order[..held].to_vec();
    let mut train = order[held..].to_vec();
    heldout.sort_unstable();
    train.sort_unstable();
    Ok((train, heldout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_out_split_is_deterministic_disjoint_and_never_empty() {
        let (train, held) = split_heldout(20, 0.1, 7).unwrap();
        assert_eq!((train.len(), held.len()), (18, 2));
        assert!(held.iter().all(|h| !train.contains(h)));
        let mut all: Vec<usize> = train.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(split_heldout(20, 0.1, 7).unwrap(), (train.clone(), held.clone()), "same seed, same split");
        let other: Vec<Vec<usize>> = (0..8).map(|s| split_heldout(20, 0.1, s).unwrap().1).collect();
        assert!(other.iter().any(|h| *h != held), "the seed moves the split");
        let e = split_heldout(4, 0.1, 0).unwrap_err().to_string();
        assert!(e.contains("holds out none") && e.contains("folder"), "{e}");
        let e = split_heldout(2, 0.9, 0).unwrap_err().to_string();
        assert!(e.contains("leaves no image to train on"), "{e}");
    }

    #[test]
    fn repeat_folders_parse_as_kohya_does() {
        assert_eq!(repeat_folder("10_zorb"), Some((10, "zorb")));
        assert_eq!(repeat_folder("3_two_words"), Some((3, "two_words")));
        assert_eq!(repeat_folder("zorb"), None);
        assert_eq!(repeat_folder("x_zorb"), None);
        assert_eq!(repeat_folder("_zorb"), None);
    }

    #[test]
    fn buckets_are_step_multiples_within_the_area_and_fit_aspect() {
        let b = buckets(128, 32, 2.0);
        assert!(b.contains(&(128, 128)));
        assert!(b.iter().all(|&(w, h)| w % 32 == 0 && h % 32 == 0 && w * h <= 128 * 128));
        assert!(b.iter().all(|&(w, h)| w.max(h) as f64 / w.min(h) as f64 <= 2.0));
        assert_eq!(bucket_for(200, 200, &b), (128, 128));
        let wide = bucket_for(300, 150, &b);
        assert!(wide.0 > wide.1, "{wide:?}");
        let tall = bucket_for(100, 190, &b);
        assert!(tall.1 > tall.0, "{tall:?}");
        assert_eq!(buckets(64, 64, 2.0), vec![(64, 64)]);
    }

    #[test]
    fn fitting_covers_and_crops_to_the_bucket() {
        let img = RgbImage::from_fn(200, 100, |x, _| image::Rgb([(x % 256) as u8, 0, 0]));
        let f = fit_to_bucket(&img, (64, 64));
        assert_eq!(f.dimensions(), (64, 64));
        // The centre of the source lands in the centre of the crop.
        assert!((f.get_pixel(32, 32)[0] as i32 - 100).abs() <= 3, "{}", f.get_pixel(32, 32)[0]);
    }

    #[test]
    fn sampler_honours_repeats_and_keeps_buckets_apart() {
        let mk = |w: u32, h: u32, repeats: usize| TrainImage {
            rel: String::new(),
            image: RgbImage::new(w, h),
            caption: String::new(),
            repeats,
            folder: ".".into(),
        };
        let images = vec![mk(64, 64, 1), mk(64, 64, 3), mk(128, 64, 2)];
        let e = entries(&images, &[64, 96], 32, 2.0);
        let mut s = BatchSampler::new(e, &images, 2);
        assert_eq!(s.epoch_len(), 12);
        let mut rng = Rng::new(0);
        let mut counts = [0usize; 3];
        let mut seen = 0;
        while seen < s.epoch_len() {
            let b = s.next_batch(&mut rng);
            assert!(!b.is_empty() && b.len() <= 2);
            assert!(b.iter().all(|x| x.bucket == b[0].bucket), "one bucket per batch");
            for x in &b {
                counts[x.image] += 1;
            }
            seen += b.len();
        }
        assert_eq!(counts, [2, 6, 4], "each image once per resolution per repeat");
        assert_eq!(s.epoch, 1);
    }
}
