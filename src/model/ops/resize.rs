//! Antialiased bicubic resampling, as PyTorch's `interpolate(mode="bicubic", antialias=True)`
//! and PIL's `BICUBIC` resize: a separable cubic filter (a = −0.5) whose support widens with
//! the downscale factor, so shrinking averages instead of aliasing. CLIP scorers are trained on
//! images shrunk this way; nearest or plain bilinear shrinking shifts their scores.

/// The cubic convolution kernel with a = −0.5.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index and the normalised weights.
fn weights(input: usize, output: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = input as f64 / output as f64;
    let support_scale = scale.max(1.0);
    let support = 2.0 * support_scale;
    (0..output)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(input);
            let mut w: Vec<f64> = (lo..hi).map(|j| cubic((j as f64 - center + 0.5) / support_scale)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                for v in &mut w {
                    *v /= total;
                }
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Resizes one channel-major image `[c, h, w]` to `[c, oh, ow]`.
pub fn resize_bicubic_aa(src: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let wx = weights(w, ow);
    let wy = weights(h, oh);
    // Horizontal pass: [c, h, ow].
    let mut tmp = vec![0f32; c * h * ow];
    for ch in 0..c {
        for y in 0..h {
            let row = &src[(ch * h + y) * w..][..w];
            let out = &mut tmp[(ch * h + y) * ow..][..ow];
            for (o, (lo, ws)) in out.iter_mut().zip(&wx) {
                *o = ws.iter().zip(&row[*lo..]).map(|(a, b)| a * b).sum();
            }
        }
    }
    // Vertical pass: [c, oh, ow].
    let mut dst = vec![0f32; c * oh * ow];
    for ch in 0..c {
        for (oy, (lo, ws)) in wy.iter().enumerate() {
            let out = &mut dst[(ch * oh + oy) * ow..][..ow];
            for (k, wk) in ws.iter().enumerate() {
                let row = &tmp[(ch * h + lo + k) * ow..][..ow];
                for (o, v) in out.iter_mut().zip(row) {
                    *o += wk * v;
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant_and_weights_sum_to_one() {
        let src = vec![0.25f32; 3 * 17 * 9];
        let out = resize_bicubic_aa(&src, 3, 17, 9, 5, 4);
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-6));
        for (_, w) in weights(128, 64) {
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn halving_averages_neighbours() {
        // A 1-pixel checkerboard shrunk 2× becomes nearly flat grey (no aliasing).
        let (h, w) = (32, 32);
        let src: Vec<f32> = (0..h * w).map(|i| ((i / w + i % w) % 2) as f32).collect();
        let out = resize_bicubic_aa(&src, 1, h, w, 16, 16);
        for v in &out[16 * 2..16 * 14] {
            assert!((v - 0.5).abs() < 0.05, "{v}");
        }
    }
}
