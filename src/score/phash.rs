//! A perceptual hash: how alike two images look at a glance (layout and edges, not colour),
//! as a bit distance. The dataset check finds near-duplicate training images with it, and the
//! memorization check finds the training image a generated one was copied from.

use image::RgbImage;

/// Bits in a perceptual hash: 16×16 horizontal and 16×16 vertical neighbour comparisons, two
/// bits each (brighter by more than a dead zone, darker by more than it).
pub const HASH_BITS: u32 = 1024;

/// A difference hash (dHash) with a dead zone. Plain dHash sets a bit whenever one pixel is
/// brighter than its neighbour, so flat areas (skies, studio backdrops) flip bits on
/// compression noise; here a pair sets a bit only when it differs by more than 2/255, in
/// either direction, and horizontal and vertical neighbours both count.
///
/// The image is shrunk to 17×16 and 16×17 grey first, so the hash ignores size and fine noise;
/// identical images are at distance 0, a shape moved by a third of the image at hundreds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerceptualHash([u64; 16]);

impl PerceptualHash {
    pub fn of(img: &RgbImage) -> Self {
        const DEAD: f32 = 2.0;
        let gray = image::DynamicImage::ImageRgb8(img.clone()).to_luma32f();
        let small_h = image::imageops::resize(&gray, 17, 16, image::imageops::FilterType::Triangle);
        let small_v = image::imageops::resize(&gray, 16, 17, image::imageops::FilterType::Triangle);
        let mut bits = [0u64; 16];
        let mut i = 0usize;
        let mut push = |d: f32| {
            // Luma32f is in [0, 1].
            let d = d * 255.0;
            if d > DEAD {
                bits[i / 64] |= 1 << (i % 64);
            }
            if d < -DEAD {
                bits[(i + 1) / 64] |= 1 << ((i + 1) % 64);
            }
            i += 2;
        };
        for y in 0..16 {
            for x in 0..16 {
                push(small_h.get_pixel(x, y)[0] - small_h.get_pixel(x + 1, y)[0]);
            }
        }
        for y in 0..16 {
            for x in 0..16 {
                push(small_v.get_pixel(x, y)[0] - small_v.get_pixel(x, y + 1)[0]);
            }
        }
        PerceptualHash(bits)
    }

    /// Differing bits, 0 to [`HASH_BITS`].
    pub fn distance(&self, other: &Self) -> u32 {
        self.0.iter().zip(&other.0).map(|(a, b)| (a ^ b).count_ones()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A magenta disc at `x` on a sky-like gradient, or a square when `square`.
    fn scene(x: i32, square: bool) -> RgbImage {
        RgbImage::from_fn(128, 128, |px, py| {
            let (dx, dy) = (px as i32 - x, py as i32 - 64);
            let inside = if square { dx.abs() < 18 && dy.abs() < 18 } else { dx * dx + dy * dy < 400 };
            if inside { image::Rgb([230, 60, 200]) } else { image::Rgb([110, 170, (245 - py / 2) as u8]) }
        })
    }

    fn noisy(img: &RgbImage, amplitude: f32, seed: u64) -> RgbImage {
        let mut rng = crate::model::noise::Rng::new(seed);
        let mut out = img.clone();
        for p in out.pixels_mut() {
            for c in 0..3 {
                p[c] = (p[c] as f32 + rng.normal() as f32 * amplitude).round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }

    #[test]
    fn copies_are_close_and_other_pictures_far() {
        let a = scene(40, false);
        let h = PerceptualHash::of(&a);
        assert_eq!(h.distance(&h), 0);
        assert_eq!(h.distance(&PerceptualHash::of(&a.clone())), 0, "identical pixels, identical hash");
        let small = image::imageops::resize(&a, 96, 96, image::imageops::FilterType::Triangle);
        let d_small = h.distance(&PerceptualHash::of(&small));
        let d_noisy = h.distance(&PerceptualHash::of(&noisy(&a, 2.5, 1)));
        assert!(d_small <= 8, "resized copy: {d_small}");
        assert!(d_noisy <= 8, "copy with noise (σ 2.5/255): {d_noisy}");
        let d_moved = h.distance(&PerceptualHash::of(&scene(80, false)));
        let d_square = h.distance(&PerceptualHash::of(&scene(40, true)));
        assert!(d_moved > 16, "moved disc: {d_moved}");
        assert!(d_square > 16, "a square in its place: {d_square}");
        assert!(d_moved.max(d_square) <= HASH_BITS);
    }
}
