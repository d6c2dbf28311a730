//! The project's own seeded random numbers, so a seed means the same noise on every machine.
//!
//! candle's device RNGs cannot be seeded on the CPU and differ between backends, so all noise is
//! made here, on the CPU, and then moved to the device. The algorithm is fixed and documented
//! (docs/suites.md, "Seeds"), and changing it changes every image, so it is covered by a test that pins
//! the first values:
//!
//! * the generator is xoshiro256** (Blackman & Vigna), its 256-bit state filled from the seed
//!   by SplitMix64;
//! * a uniform in [0, 1) takes the top 53 bits of one output;
//! * standard normals come in pairs by Box–Muller: with u1 = 1 − uniform (so it is in (0, 1]) and
//!   u2 = uniform, `r = sqrt(−2 ln u1)`, the pair is `(r cos 2πu2, r sin 2πu2)`, used in that order,
//!   computed in f64 and rounded to f32;
//! * the initial latents of image `i` of a request with seed `s` come from the generator seeded
//!   with `s + i` (wrapping), filled in NCHW order. An image's noise therefore does not depend on
//!   the batch it was generated in.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// xoshiro256** seeded by SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        };
        let s = [next(), next(), next(), next()];
        Rng { s, spare_normal: None }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n). `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        // Multiply-shift: unbiased enough for n far below 2^64.
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box–Muller, pairs used in order).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare_normal = Some(r * s);
        r * c
    }

    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal() as f32).collect()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Initial latents for a batch: image `i` uses seed `seed + i`. Shape `[n, c, h, w]`.
pub fn initial_latents(seeds: &[u64], c: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let per = c * h * w;
    let mut data = Vec::with_capacity(seeds.len() * per);
    for &seed in seeds {
        data.extend(Rng::new(seed).normals(per));
    }
    Ok(Tensor::from_vec(data, (seeds.len(), c, h, w), device)?)
}

/// A tensor of standard normals from `rng`, made on the CPU and moved to `device`.
pub fn randn(rng: &mut Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(rng.normals(n), shape, &Device::Cpu)?.to_device(device)?)
}

/// Unit tests' random CPU tensor: standard normals from `seed`.
#[cfg(test)]
pub fn seeded_randn(shape: &[usize], seed: u64) -> Tensor {
    randn(&mut Rng::new(seed), shape, &Device::Cpu).expect("a CPU tensor of normals")
}
