//! Data augmentation: caption work (tag shuffling that keeps the first N tags, tag dropout,
//! whole-caption dropout) and image work (horizontal flip, colour jitter, and the "wild"
//! augmentations: sketch, pixelate, oil-paint-like blur, noise, perspective).
//!
//! Each wild augmentation changes what the picture looks like, so it appends a tag naming
//! itself ([`Wild::tag`]) to the caption: the LoRA learns the look as a separate, promptable
//! thing instead of mixing it into the concept. All randomness comes from the caller's
//! [`Rng`], so a seed gives the same augmented data everywhere.

use image::{Rgb, RgbImage};

use crate::model::noise::Rng;

/// How captions are varied per step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CaptionOptions {
    /// The first N tags stay in place and are never dropped (the trigger word, usually).
    pub keep_tokens: usize,
    /// Shuffle the tags after the first `keep_tokens`.
    pub shuffle: bool,
    /// Probability of dropping each tag after the first `keep_tokens`.
    pub tag_dropout: f64,
    /// Probability of training a step on the empty caption (keeps guidance working).
    pub caption_dropout: f64,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions { keep_tokens: 1, shuffle: true, tag_dropout: 0.0, caption_dropout: 0.0 }
    }
}

/// Splits a caption into its comma-separated tags (trimmed, empty ones removed).
pub fn tags(caption: &str) -> Vec<&str> {
    caption.split(',').map(str::trim).filter(|t| !t.is_empty()).collect()
}

/// The caption one step trains on. `extra` tags (from wild augmentations) join the shuffled
/// tags but are never dropped: they describe what the image really shows.
pub fn process_caption(caption: &str, extra: &[&str], o: &CaptionOptions, rng: &mut Rng) -> String {
    if o.caption_dropout > 0.0 && rng.uniform() < o.caption_dropout {
        return String::new();
    }
    let all = tags(caption);
    let keep = o.keep_tokens.min(all.len());
    let mut out: Vec<&str> = all[..keep].to_vec();
    let mut rest: Vec<&str> = Vec::with_capacity(all.len() - keep + extra.len());
    for t in &all[keep..] {
        if o.tag_dropout > 0.0 && rng.uniform() < o.tag_dropout {
            continue;
        }
        rest.push(t);
    }
    rest.extend(extra.iter().copied());
    if o.shuffle {
        rng.shuffle(&mut rest);
    }
    out.extend(rest);
    out.join(", ")
}

/// The augmentations that change the look of an image, each with the tag it adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wild {
    Sketch,
    Pixelate,
    OilPaint,
    Noise,
    Perspective,
}

impl Wild {
    pub const ALL: [Wild; 5] = [Wild::Sketch, Wild::Pixelate, Wild::OilPaint, Wild::Noise, Wild::Perspective];

    /// The tag appended to the caption of an image this augmentation changed.
    pub fn tag(self) -> &'static str {
        match self {
            Wild::Sketch => "sketch",
            Wild::Pixelate => "pixel art",
            Wild::OilPaint => "oil painting",
            Wild::Noise => "noisy",
            Wild::Perspective => "perspective",
        }
    }

    /// The config key of its probability.
    pub fn key(self) -> &'static str {
        match self {
            Wild::Sketch => "sketch",
            Wild::Pixelate => "pixelate",
            Wild::OilPaint => "oil_paint",
            Wild::Noise => "noise",
            Wild::Perspective => "perspective",
        }
    }
}

/// How images are varied. Probabilities are per augmented copy ("variant") of an image.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImageOptions {
    /// Probability of a horizontal flip.
    pub flip: f64,
    /// Colour jitter strength: brightness, contrast and saturation vary by up to ±this
    /// fraction, hue by up to ±this × 30°. 0 disables it.
    pub color_jitter: f64,
    /// Probability of each wild augmentation, in [`Wild::ALL`] order.
    pub wild: [f64; 5],
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions { flip: 0.0, color_jitter: 0.0, wild: [0.0; 5] }
    }
}

impl ImageOptions {
    /// True when any augmentation can change an image.
    pub fn any(&self) -> bool {
        self.flip > 0.0 || self.color_jitter > 0.0 || self.wild.iter().any(|&p| p > 0.0)
    }
}

/// An augmented image and the tags its augmentations add to the caption.
#[derive(Debug, Clone)]
pub struct Augmented {
    pub image: RgbImage,
    pub tags: Vec<&'static str>,
}

/// Applies the augmentations `o` draws from `rng` to `img`.
pub fn augment(img: &RgbImage, o: &ImageOptions, rng: &mut Rng) -> Augmented {
    let mut image = img.clone();
    let mut tags = Vec::new();
    if o.flip > 0.0 && rng.uniform() < o.flip {
        image = image::imageops::flip_horizontal(&image);
    }
    if o.color_jitter > 0.0 {
        image = color_jitter(&image, o.color_jitter, rng);
    }
    for (w, &p) in Wild::ALL.iter().zip(&o.wild) {
        if p > 0.0 && rng.uniform() < p {
            image = apply_wild(&image, *w, rng);
            tags.push(w.tag());
        }
    }
    Augmented { image, tags }
}

/// One wild augmentation with parameters drawn from `rng`.
pub fn apply_wild(img: &RgbImage, w: Wild, rng: &mut Rng) -> RgbImage {
    let side = img.width().min(img.height()) as f64;
    match w {
        Wild::Sketch => sketch(img),
        Wild::Pixelate => {
            // Blocks of 1/32 to 1/16 of the image side: clearly pixelated, shapes still legible.
            let block = ((side / 32.0) * (1.0 + rng.uniform())).round().max(2.0) as u32;
            pixelate(img, block)
        }
        Wild::OilPaint => oil_paint(img, ((side / 32.0).round() as u32).max(2)),
        Wild::Noise => add_noise(img, 0.04 + 0.08 * rng.uniform(), rng),
        Wild::Perspective => perspective(img, 0.08 + 0.1 * rng.uniform(), rng),
    }
}

fn luma(p: &Rgb<u8>) -> f32 {
    0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Brightness, contrast, saturation and hue, each drawn in ±`strength`.
pub fn color_jitter(img: &RgbImage, strength: f64, rng: &mut Rng) -> RgbImage {
    let mut draw = || (1.0 + strength * (2.0 * rng.uniform() - 1.0)) as f32;
    let (brightness, contrast, saturation) = (draw(), draw(), draw());
    let hue = (strength * (2.0 * rng.uniform() - 1.0) * std::f64::consts::PI / 6.0) as f32;
    let n = (img.width() * img.height()).max(1) as f32;
    let mean = img.pixels().map(luma).sum::<f32>() / n * brightness;
    let (s, c) = hue.sin_cos();
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let mut rgb = [p[0] as f32 * brightness, p[1] as f32 * brightness, p[2] as f32 * brightness];
        for v in &mut rgb {
            *v = mean + (*v - mean) * contrast;
        }
        let y = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
        for v in &mut rgb {
            *v = y + (*v - y) * saturation;
        }
        // Hue: rotate the chroma plane of YIQ.
        let i = 0.596 * rgb[0] - 0.274 * rgb[1] - 0.322 * rgb[2];
        let q = 0.211 * rgb[0] - 0.523 * rgb[1] + 0.312 * rgb[2];
        let (i2, q2) = (i * c - q * s, i * s + q * c);
        *p = Rgb([to_u8(y + 0.956 * i2 + 0.621 * q2), to_u8(y - 0.272 * i2 - 0.647 * q2), to_u8(y - 1.106 * i2 + 1.703 * q2)]);
    }
    out
}

/// Dark Sobel edges on white paper.
pub fn sketch(img: &RgbImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let g: Vec<f32> = img.pixels().map(luma).collect();
    let at = |x: i64, y: i64| g[(y.clamp(0, h as i64 - 1) as u32 * w + x.clamp(0, w as i64 - 1) as u32) as usize];
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as i64, y as i64);
        let gx = at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1) - at(x - 1, y - 1) - 2.0 * at(x - 1, y) - at(x - 1, y + 1);
        let gy = at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1) - at(x - 1, y - 1) - 2.0 * at(x, y - 1) - at(x + 1, y - 1);
        let v = to_u8(255.0 - (gx * gx + gy * gy).sqrt() * 0.75);
        Rgb([v, v, v])
    })
}

/// Averages `block`×`block` cells.
pub fn pixelate(img: &RgbImage, block: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let block = block.max(1);
    let mut out = img.clone();
    for by in (0..h).step_by(block as usize) {
        for bx in (0..w).step_by(block as usize) {
            let (x1, y1) = ((bx + block).min(w), (by + block).min(h));
            let mut sum = [0u32; 3];
            for y in by..y1 {
                for x in bx..x1 {
                    let p = img.get_pixel(x, y);
                    for c in 0..3 {
                        sum[c] += p[c] as u32;
                    }
                }
            }
            let n = ((x1 - bx) * (y1 - by)).max(1);
            let avg = Rgb([(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8]);
            for y in by..y1 {
                for x in bx..x1 {
                    out.put_pixel(x, y, avg);
                }
            }
        }
    }
    out
}

/// A Kuwahara filter: each pixel takes the mean of the least varied of the four quadrants
/// around it. Flat regions flatten further and edges stay sharp, like brush strokes.
pub fn oil_paint(img: &RgbImage, radius: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let r = radius as i64;
    let px = |x: i64, y: i64| img.get_pixel(x.clamp(0, w as i64 - 1) as u32, y.clamp(0, h as i64 - 1) as u32);
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as i64, y as i64);
        let mut best = (f32::INFINITY, [0f32; 3]);
        for (dx0, dy0) in [(-r, -r), (0, -r), (-r, 0), (0, 0)] {
            let (mut sum, mut sq, mut n) = ([0f32; 3], 0f32, 0f32);
            for dy in dy0..=dy0 + r {
                for dx in dx0..=dx0 + r {
                    let p = px(x + dx, y + dy);
                    for c in 0..3 {
                        sum[c] += p[c] as f32;
                    }
                    let l = luma(p);
                    sq += l * l;
                    n += 1.0;
                }
            }
            let mean_l = (0.299 * sum[0] + 0.587 * sum[1] + 0.114 * sum[2]) / n;
            let var = sq / n - mean_l * mean_l;
            if var < best.0 {
                best = (var, [sum[0] / n, sum[1] / n, sum[2] / n]);
            }
        }
        Rgb([to_u8(best.1[0]), to_u8(best.1[1]), to_u8(best.1[2])])
    })
}

/// Gaussian noise with standard deviation `sigma` (fraction of full scale), per channel.
pub fn add_noise(img: &RgbImage, sigma: f64, rng: &mut Rng) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for c in 0..3 {
            p[c] = to_u8(p[c] as f32 + (rng.normal() * sigma * 255.0) as f32);
        }
    }
    out
}

/// A random perspective warp: each corner moves inward or outward by up to `strength` of the
/// side; pixels are sampled bilinearly, with edge pixels repeated outside the image.
pub fn perspective(img: &RgbImage, strength: f64, rng: &mut Rng) -> RgbImage {
    let (w, h) = img.dimensions();
    let (fw, fh) = (w as f64 - 1.0, h as f64 - 1.0);
    let dst = [(0.0, 0.0), (fw, 0.0), (fw, fh), (0.0, fh)];
    let mut src = dst;
    for p in &mut src {
        p.0 += (2.0 * rng.uniform() - 1.0) * strength * fw;
        p.1 += (2.0 * rng.uniform() - 1.0) * strength * fh;
    }
    // Output pixel (x, y) samples the input at H(x, y): the map from the image's corners to the
    // displaced ones.
    let Some(hm) = homography(&dst, &src) else { return img.clone() };
    let sample = |x: f64, y: f64, c: usize| -> f32 {
        let x = x.clamp(0.0, fw);
        let y = y.clamp(0.0, fh);
        let (x0, y0) = (x.floor() as u32, y.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let (tx, ty) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
        let g = |xx, yy| img.get_pixel(xx, yy)[c] as f32;
        let top = g(x0, y0) * (1.0 - tx) + g(x1, y0) * tx;
        let bottom = g(x0, y1) * (1.0 - tx) + g(x1, y1) * tx;
        top * (1.0 - ty) + bottom * ty
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as f64, y as f64);
        let d = hm[6] * x + hm[7] * y + 1.0;
        let (sx, sy) = ((hm[0] * x + hm[1] * y + hm[2]) / d, (hm[3] * x + hm[4] * y + hm[5]) / d);
        Rgb([to_u8(sample(sx, sy, 0)), to_u8(sample(sx, sy, 1)), to_u8(sample(sx, sy, 2))])
    })
}

/// The 3×3 homography (last entry 1) taking `from[i]` to `to[i]`, by Gaussian elimination with
/// partial pivoting; `None` for degenerate corners.
pub fn homography(from: &[(f64, f64); 4], to: &[(f64, f64); 4]) -> Option<[f64; 8]> {
    let mut a = [[0f64; 9]; 8];
    for i in 0..4 {
        let ((x, y), (u, v)) = (from[i], to[i]);
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col];
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (v, p) in r.iter_mut().zip(pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    let mut hm = [0f64; 8];
    for i in 0..8 {
        hm[i] = a[i][8] / a[i][i];
    }
    Some(hm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_image() -> RgbImage {
        RgbImage::from_fn(32, 24, |x, y| {
            if (8..20).contains(&x) && (6..16).contains(&y) { Rgb([230, 60, 200]) } else { Rgb([110 + 3 * x as u8, 170, 245 - 4 * y as u8]) }
        })
    }

    #[test]
    fn keep_tokens_stay_first_and_the_rest_is_shuffled() {
        let o = CaptionOptions { keep_tokens: 1, shuffle: true, tag_dropout: 0.0, caption_dropout: 0.0 };
        let mut rng = Rng::new(1);
        let mut orders = std::collections::HashSet::new();
        for _ in 0..50 {
            let c = process_caption("zorb, large, in the center, sky background", &[], &o, &mut rng);
            assert!(c.starts_with("zorb, "), "{c}");
            let mut t = tags(&c);
            orders.insert(c.clone());
            t.sort();
            assert_eq!(t, vec!["in the center", "large", "sky background", "zorb"]);
        }
        assert!(orders.len() > 3, "shuffling gives several orders: {orders:?}");
        let fixed = CaptionOptions { shuffle: false, ..o };
        assert_eq!(process_caption(" zorb,large ,, sky background", &[], &fixed, &mut rng), "zorb, large, sky background");
    }

    #[test]
    fn tag_dropout_never_drops_kept_or_augmentation_tags() {
        let o = CaptionOptions { keep_tokens: 2, shuffle: true, tag_dropout: 1.0, caption_dropout: 0.0 };
        let mut rng = Rng::new(2);
        let c = process_caption("zorb, large, in the center, sky background", &["sketch"], &o, &mut rng);
        assert_eq!(c, "zorb, large, sketch");
        let half = CaptionOptions { tag_dropout: 0.5, keep_tokens: 0, ..o };
        let lens: usize = (0..200).map(|_| tags(&process_caption("a, b, c, d", &[], &half, &mut rng)).len()).sum();
        assert!((300..500).contains(&lens), "about half the tags survive: {lens} of 800");
        let all_gone = CaptionOptions { caption_dropout: 1.0, ..o };
        assert_eq!(process_caption("zorb, large", &["sketch"], &all_gone, &mut rng), "");
    }

    #[test]
    fn wild_augmentations_change_the_image_and_add_their_tag() {
        let img = test_image();
        let o = ImageOptions { flip: 0.0, color_jitter: 0.0, wild: [1.0, 0.0, 0.0, 0.0, 0.0] };
        let a = augment(&img, &o, &mut Rng::new(3));
        assert_eq!(a.tags, vec!["sketch"]);
        // Sketch: near-white paper away from edges, dark lines on the rectangle's border.
        assert!(a.image.get_pixel(2, 2)[0] > 200);
        assert!(a.image.get_pixel(8, 10)[0] < 180, "{:?}", a.image.get_pixel(8, 10));
        for (i, w) in Wild::ALL.iter().enumerate() {
            let mut p = [0.0; 5];
            p[i] = 1.0;
            let a = augment(&img, &ImageOptions { wild: p, ..Default::default() }, &mut Rng::new(4));
            assert_eq!(a.tags, vec![w.tag()]);
            assert_eq!(a.image.dimensions(), img.dimensions());
            assert_ne!(a.image, img, "{w:?} changed nothing");
        }
        let none = augment(&img, &ImageOptions::default(), &mut Rng::new(5));
        assert_eq!(none.image, img);
        assert!(none.tags.is_empty());
    }

    #[test]
    fn flip_mirrors_and_jitter_stays_in_range() {
        let img = test_image();
        let f = augment(&img, &ImageOptions { flip: 1.0, ..Default::default() }, &mut Rng::new(6));
        assert_eq!(f.image.get_pixel(0, 10), img.get_pixel(31, 10));
        assert_eq!(f.image.get_pixel(12, 10), img.get_pixel(19, 10));
        let j = color_jitter(&img, 0.3, &mut Rng::new(7));
        assert_ne!(j, img);
        // A zero-strength jitter is the identity up to rounding.
        let z = color_jitter(&img, 0.0, &mut Rng::new(8));
        for (a, b) in z.pixels().zip(img.pixels()) {
            for c in 0..3 {
                assert!((a[c] as i32 - b[c] as i32).abs() <= 1);
            }
        }
    }

    #[test]
    fn pixelate_makes_flat_blocks_and_perspective_identity_is_exact() {
        let img = test_image();
        let p = pixelate(&img, 4);
        for by in (0..24).step_by(4) {
            for bx in (0..32).step_by(4) {
                let first = *p.get_pixel(bx, by);
                for y in by..by + 4 {
                    for x in bx..bx + 4 {
                        assert_eq!(*p.get_pixel(x, y), first);
                    }
                }
            }
        }
        let corners = [(0.0, 0.0), (31.0, 0.0), (31.0, 23.0), (0.0, 23.0)];
        let h = homography(&corners, &corners).unwrap();
        for (g, e) in h.iter().zip([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]) {
            assert!((g - e).abs() < 1e-9);
        }
        assert_eq!(perspective(&img, 0.0, &mut Rng::new(9)), img);
    }
}
