//! The shapes-world renderer: background gradients (with stars at night), one object drawn
//! from its signed distance function with analytic anti-aliasing, and the `sticker` style.
//!
//! Coordinates are fractions of the image side with y growing downwards; pixel `(x, y)` is
//! sampled at its centre `((x + 0.5) / res, (y + 0.5) / res)`. Coverage of a pixel by a shape is
//! `clamp(0.5 − sdf · res, 0, 1)`, i.e. a one-pixel-wide linear ramp across the edge.

use image::{Rgb, RgbImage};
use rayon::prelude::*;

use super::attributes::{Attributes, Shape};
use crate::model::noise::Rng;

/// Largest jitter of the object's centre, as a fraction of the image side.
pub const POSITION_JITTER: f32 = 0.03;
/// Largest relative jitter of the radius (±10 %).
pub const RADIUS_JITTER: f32 = 0.1;
/// Star dots on a night background.
pub const STARS: usize = 14;
/// Width of the sticker outline in pixels, at every resolution.
pub const OUTLINE_PX: f32 = 3.0;
/// Grey level of the sticker outline.
pub const OUTLINE_LEVEL: f32 = 0.05;
/// The resolution the world is defined at (and the models were trained at).
pub const DEFAULT_RESOLUTION: u32 = 128;

/// How images look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Style {
    #[default]
    Plain,
    /// Backgrounds half desaturated, every shape outlined in black.
    Sticker,
}

impl Style {
    pub const ALL: &'static [Style] = &[Style::Plain, Style::Sticker];

    pub fn name(self) -> &'static str {
        match self {
            Style::Plain => "plain",
            Style::Sticker => "sticker",
        }
    }

    /// Parses `plain` or `sticker` (for flags and suites).
    pub fn parse(text: &str) -> Result<Self, String> {
        Style::ALL
            .iter()
            .copied()
            .find(|s| s.name() == text.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown style `{text}`; known styles: plain, sticker"))
    }
}

impl std::fmt::Display for Style {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderOptions {
    /// Side of the square image in pixels.
    pub resolution: u32,
    pub style: Style,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions { resolution: DEFAULT_RESOLUTION, style: Style::Plain }
    }
}

/// The random part of one image: where exactly the object sits, how big it is, where the stars
/// are. Drawn from the RNG in a fixed order, so an image depends only on its seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Object centre, fractions of the image side.
    pub cx: f32,
    pub cy: f32,
    /// Object radius, fraction of the image side.
    pub radius: f32,
    /// Star centres `(x, y)`; drawn for every image so the stream does not depend on the
    /// background, used only at night.
    pub stars: [(f32, f32); STARS],
}

impl Placement {
    pub fn draw(a: &Attributes, rng: &mut Rng) -> Self {
        let mut symmetric = |scale: f32| (rng.uniform() as f32 * 2.0 - 1.0) * scale;
        let (x, y) = a.position.center();
        let cx = x + symmetric(POSITION_JITTER);
        let cy = y + symmetric(POSITION_JITTER);
        let radius = a.size.radius() * (1.0 + symmetric(RADIUS_JITTER));
        let mut stars = [(0.0, 0.0); STARS];
        for s in &mut stars {
            *s = (rng.uniform() as f32, rng.uniform() as f32);
        }
        Placement { cx, cy, radius, stars }
    }
}

/// Signed distance from `(dx, dy)` (relative to the object's centre, y down) to the outline of
/// the shape of radius `r`; negative inside. Concepts use their own geometry (zorb: a ring).
pub fn sdf(shape: Shape, dx: f32, dy: f32, r: f32) -> f32 {
    match shape {
        Shape::Circle => (dx * dx + dy * dy).sqrt() - r,
        Shape::Square => dx.abs().max(dy.abs()) - 0.85 * r,
        Shape::Diamond => (dx.abs() + dy.abs() - 1.2 * r) / std::f32::consts::SQRT_2,
        Shape::Concept(_) => ((dx * dx + dy * dy).sqrt() - 0.8 * r).abs() - 0.22 * r,
        Shape::Triangle => triangle_sdf(dx, dy, 0.95 * r),
    }
}

/// Exact distance to an equilateral triangle pointing up with half side `rr`, its centroid at
/// the origin: fold onto one half, then onto the edge's frame, and measure to the clamped edge.
fn triangle_sdf(dx: f32, dy: f32, rr: f32) -> f32 {
    let k = 3f32.sqrt();
    let mut px = dx.abs() - rr;
    // The y axis is flipped so that the triangle points up on screen.
    let mut py = -dy + rr / k;
    if px + k * py > 0.0 {
        (px, py) = ((px - k * py) / 2.0, (-k * px - py) / 2.0);
    }
    px -= px.clamp(-2.0 * rr, 0.0);
    // sign(0) is 0, as in the reference: points exactly on the base line are on the edge.
    let sign = if py > 0.0 {
        1.0
    } else if py < 0.0 {
        -1.0
    } else {
        0.0
    };
    -(px * px + py * py).sqrt() * sign
}

/// Anti-aliased coverage of a pixel at signed distance `d` pixels from an edge.
fn coverage(d_px: f32) -> f32 {
    (0.5 - d_px).clamp(0.0, 1.0)
}

fn mix(c: &mut [f32; 3], target: [f32; 3], cov: f32) {
    for (v, t) in c.iter_mut().zip(target) {
        *v = *v * (1.0 - cov) + t * cov;
    }
}

fn unit_rgb(rgb: [u8; 3]) -> [f32; 3] {
    rgb.map(|v| v as f32 / 255.0)
}

/// Renders one image; the placement jitter and stars come from `rng`.
pub fn render(a: &Attributes, options: &RenderOptions, rng: &mut Rng) -> RgbImage {
    let placement = Placement::draw(a, rng);
    render_placed(a, &placement, options)
}

/// Renders one image with an explicit placement.
pub fn render_placed(a: &Attributes, p: &Placement, options: &RenderOptions) -> RgbImage {
    to_image(&paint(a, p, options, true), options.resolution)
}

/// Renders many images in parallel; image `i` uses an RNG seeded with `jobs[i].1`, so the
/// result does not depend on the number of threads.
pub fn render_batch(jobs: &[(Attributes, u64)], options: &RenderOptions) -> Vec<RgbImage> {
    jobs.par_iter().map(|(a, seed)| render(a, options, &mut Rng::new(*seed))).collect()
}

fn to_image(buf: &[[f32; 3]], res: u32) -> RgbImage {
    let mut img = RgbImage::new(res, res);
    for (px, c) in img.pixels_mut().zip(buf) {
        *px = Rgb(c.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8));
    }
    img
}

/// Linear-light floats, row-major. With `cull`, the object is evaluated only in a box around
/// it; outside that box every coverage is exactly zero (checked by a test against `cull = false`).
fn paint(a: &Attributes, p: &Placement, options: &RenderOptions, cull: bool) -> Vec<[f32; 3]> {
    let n = options.resolution as usize;
    let res = n as f32;
    let coord = |i: usize| (i as f32 + 0.5) / res;
    let mut buf = vec![[0f32; 3]; n * n];

    // Background: a vertical gradient, one colour per row.
    let (top, bottom) = a.background.gradient();
    let (top, bottom) = (unit_rgb(top), unit_rgb(bottom));
    for (y, row) in buf.chunks_exact_mut(n).enumerate() {
        let t = coord(y);
        let c = [0, 1, 2].map(|k| top[k] * (1.0 - t) + bottom[k] * t);
        row.fill(c);
    }

    if a.background.has_stars() {
        // A star brightens pixels within 1.2 px of its centre; nearer stars win, which is the
        // same as taking the largest coverage over stars.
        let mut star_cov = vec![0f32; n * n];
        for &(sx, sy) in &p.stars {
            let (x0, x1) = pixel_span(sx, 2.0 / res, n, cull);
            let (y0, y1) = pixel_span(sy, 2.0 / res, n, cull);
            for y in y0..y1 {
                for x in x0..x1 {
                    let (dx, dy) = (coord(x) - sx, coord(y) - sy);
                    let d = (dx * dx + dy * dy).sqrt() * res;
                    let cov = (1.2 - d).clamp(0.0, 1.0);
                    let slot = &mut star_cov[y * n + x];
                    *slot = slot.max(cov);
                }
            }
        }
        for (c, &cov) in buf.iter_mut().zip(&star_cov) {
            if cov > 0.0 {
                mix(c, [1.0; 3], cov);
            }
        }
    }

    let sticker = options.style == Style::Sticker;
    if sticker {
        // Half-way to the pixel's own grey.
        for c in &mut buf {
            let grey = (c[0] + c[1] + c[2]) / 3.0;
            *c = c.map(|v| 0.5 * v + 0.5 * grey);
        }
    }

    let body = unit_rgb(a.body_rgb());
    let dot = a.shape.concept().map(|c| unit_rgb(c.dot_color()));
    let r = p.radius;
    // Every shape lies within 1.2 r of its centre; the margin covers the outline and the
    // anti-aliasing ramp (the diamond's distance shrinks by √2 along the box's edge).
    let half = 1.25 * r + (OUTLINE_PX + 3.0) / res;
    let (x0, x1) = pixel_span(p.cx, half, n, cull);
    let (y0, y1) = pixel_span(p.cy, half, n, cull);
    for y in y0..y1 {
        let dy = coord(y) - p.cy;
        for x in x0..x1 {
            let dx = coord(x) - p.cx;
            let c = &mut buf[y * n + x];
            let d = sdf(a.shape, dx, dy, r) * res;
            if sticker {
                mix(c, [OUTLINE_LEVEL; 3], coverage(d - OUTLINE_PX));
            }
            mix(c, body, coverage(d));
            if let Some(dot) = dot {
                mix(c, dot, coverage(sdf(Shape::Circle, dx, dy, 0.28 * r) * res));
            }
        }
    }
    buf
}

/// Pixel index range `[lo, hi)` whose centres may lie within `half` of `center` (all pixels
/// when not culling).
fn pixel_span(center: f32, half: f32, n: usize, cull: bool) -> (usize, usize) {
    if !cull {
        return (0, n);
    }
    let res = n as f32;
    let lo = ((center - half) * res - 1.0).floor().max(0.0) as usize;
    let hi = ((center + half) * res + 1.0).ceil().clamp(0.0, res) as usize;
    (lo.min(n), hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::attributes::{Background, Color, Concept, Position, Size};

    #[test]
    fn culling_changes_nothing() {
        let mut rng = Rng::new(7);
        let shapes = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond, Shape::Concept(Concept::Zorb)];
        for &shape in &shapes {
            for &style in Style::ALL {
                for &res in &[16u32, 64, 128] {
                    for &size in Size::ALL {
                        for &position in Position::ALL {
                            let a =
                                Attributes { color: Color::Red, shape, size, position, background: Background::Night };
                            let p = Placement::draw(&a, &mut rng);
                            let o = RenderOptions { resolution: res, style };
                            assert_eq!(paint(&a, &p, &o, true), paint(&a, &p, &o, false), "{a:?} {o:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn triangle_sdf_matches_geometry() {
        let rr = 0.95f32;
        let k = 3f32.sqrt();
        // Centroid inside at depth rr/k (the inradius); apex above at 2rr/k, base below at rr/k.
        assert!((triangle_sdf(0.0, 0.0, rr) + rr / k).abs() < 1e-5);
        assert!(triangle_sdf(0.0, -2.0 * rr / k, rr).abs() < 1e-5);
        assert!(triangle_sdf(0.0, rr / k, rr).abs() < 1e-5);
        assert!((triangle_sdf(0.0, rr / k + 0.5, rr) - 0.5).abs() < 1e-5);
        assert!(triangle_sdf(rr, rr / k, rr).abs() < 1e-5);
        assert!(triangle_sdf(0.0, -2.0 * rr / k - 0.1, rr) > 0.0);
    }

    #[test]
    fn ring_sdf_is_hollow() {
        let z = Shape::Concept(Concept::Zorb);
        assert!(sdf(z, 0.0, 0.0, 1.0) > 0.0, "centre is outside the ring");
        assert!((sdf(z, 0.8, 0.0, 1.0) + 0.22).abs() < 1e-6, "mid-ring is 0.22 r deep");
        assert!(sdf(z, 0.0, 1.1, 1.0) > 0.0);
    }
}
