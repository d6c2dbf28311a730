//! Pixel-level comparisons: differences, structural similarity (image-compare's hybrid metric:
//! SSIM on luma plus RMS on chroma), diff heat maps, and blank/black detection.

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

/// Mean absolute difference of two images, in [0, 1].
pub fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let sum: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    Ok(sum as f64 / (a.as_raw().len() as f64 * 255.0))
}

/// Largest per-channel difference, in [0, 1].
pub fn max_abs_diff(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    Ok(a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0) as f64 / 255.0)
}

/// Structural similarity in [0, 1] (1 = identical), from image-compare's hybrid RGB comparison.
pub fn similarity(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    if a.as_raw() == b.as_raw() {
        return Ok(1.0);
    }
    let s = image_compare::rgb_hybrid_compare(a, b).map_err(|e| Error::invalid(format!("image comparison failed: {e}")))?;
    Ok(s.score.clamp(0.0, 1.0))
}

/// A heat map of where two images differ: black where equal, through red and yellow to white
/// where the per-pixel difference is largest (scaled so small differences stay visible).
pub fn diff_heat_map(a: &RgbImage, b: &RgbImage) -> Result<RgbImage> {
    same_size(a, b)?;
    let (w, h) = a.dimensions();
    let diffs: Vec<f32> = a
        .pixels()
        .zip(b.pixels())
        .map(|(p, q)| (0..3).map(|c| p[c].abs_diff(q[c]) as f32).fold(0.0, f32::max) / 255.0)
        .collect();
    // Scale so the largest difference reaches the top of the map, but never amplify more than
    // 16×: a 1/255 rounding difference should stay dark.
    let peak = diffs.iter().copied().fold(0.0, f32::max).max(1.0 / 16.0);
    let mut out = RgbImage::new(w, h);
    for (i, px) in out.pixels_mut().enumerate() {
        *px = heat((diffs[i] / peak).clamp(0.0, 1.0));
    }
    Ok(out)
}

fn heat(t: f32) -> Rgb<u8> {
    // black → red → yellow → white
    let r = (t * 3.0).clamp(0.0, 1.0);
    let g = (t * 3.0 - 1.0).clamp(0.0, 1.0);
    let b = (t * 3.0 - 2.0).clamp(0.0, 1.0);
    Rgb([(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8])
}

/// Mean and standard deviation of all channel values, in [0, 1].
pub fn mean_std(img: &RgbImage) -> (f64, f64) {
    let v = img.as_raw();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n / 255.0;
    let var = v.iter().map(|&x| (x as f64 / 255.0 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn same_size(a: &RgbImage, b: &RgbImage) -> Result<()> {
    if a.dimensions() != b.dimensions() {
        return Err(Error::invalid(format!(
            "images differ in size: {}x{} vs {}x{}",
            a.width(),
            a.height(),
            b.width(),
            b.height()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_are_fully_similar_and_differences_lower_the_score() {
        let a = RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (y * 8) as u8, 100]));
        assert_eq!(similarity(&a, &a).unwrap(), 1.0);
        assert_eq!(mean_abs_diff(&a, &a).unwrap(), 0.0);
        let mut b = a.clone();
        for x in 0..16 {
            for y in 0..16 {
                b.put_pixel(x, y, Rgb([255, 0, 0]));
            }
        }
        let s = similarity(&a, &b).unwrap();
        assert!(s < 0.95, "{s}");
        assert!(mean_abs_diff(&a, &b).unwrap() > 0.05);
        let map = diff_heat_map(&a, &b).unwrap();
        assert_eq!(map.get_pixel(31, 31), &Rgb([0, 0, 0]));
        assert!(map.get_pixel(0, 0)[0] > 200);
    }

    #[test]
    fn blank_images_have_no_spread() {
        let flat = RgbImage::from_pixel(8, 8, Rgb([10, 10, 10]));
        let (mean, std) = mean_std(&flat);
        assert!(mean < 0.05 && std == 0.0);
    }
}
