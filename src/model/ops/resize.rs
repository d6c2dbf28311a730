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

/// PyTorch's `interpolate(mode="bicubic", align_corners=False)` without antialiasing, on a
/// channel-major `[c, h, w]` grid: cubic convolution with A = −0.75, sample points
/// `(i + 0.5) · in/out − 0.5`, indices clamped at the border. DINOv2 resizes its position
/// embeddings this way to the image's patch grid.
pub fn interpolate_bicubic_torch(src: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    fn cubic(x: f64) -> f64 {
        const A: f64 = -0.75;
        let x = x.abs();
        if x <= 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
        } else {
            0.0
        }
    }
    // For each output index: four source indices (clamped) and their weights.
    let taps = |input: usize, output: usize| -> Vec<([usize; 4], [f64; 4])> {
        let scale = input as f64 / output as f64;
        (0..output)
            .map(|i| {
                let x = (i as f64 + 0.5) * scale - 0.5;
                let x0 = x.floor();
                let t = x - x0;
                let idx = |k: i64| (x0 as i64 + k).clamp(0, input as i64 - 1) as usize;
                ([idx(-1), idx(0), idx(1), idx(2)], [cubic(t + 1.0), cubic(t), cubic(1.0 - t), cubic(2.0 - t)])
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    let mut out = vec![0f32; c * oh * ow];
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for (oy, (iy, wy)) in ty.iter().enumerate() {
            for (ox, (ix, wx)) in tx.iter().enumerate() {
                let mut acc = 0f64;
                for a in 0..4 {
                    let row = &plane[iy[a] * w..];
                    let mut r = 0f64;
                    for b in 0..4 {
                        r += row[ix[b]] as f64 * wx[b];
                    }
                    acc += r * wy[a];
                }
                out[(ch * oh + oy) * ow + ox] = acc as f32;
            }
        }
    }
    out
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
