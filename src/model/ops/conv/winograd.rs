//! Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016) for the 3×3, stride-1 convolutions that do most of a UNet's and a
//! VAE's work.
//!
//! Each 2×2 block of output pixels (a *tile*) comes from the 4×4 input patch under it as
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. The kernel's transform `G g Gᵀ` is made once; the patch's
//! transform `Bᵀ d B` and the output's `Aᵀ · A` only add and subtract. Summed over input
//! channels, the element-wise products become 16 matrix products `[tiles, C] × [C, O]`: 16
//! multiplications per 4 output pixels where im2col + gemm needs 36 (2.25× fewer). The
//! transforms' coefficients are 0, ±1 and ±½, so f32 results stay within rounding of the
//! direct convolution (the tests bound the difference).
//!
//! The input is channels-last and already zero-padded (see [`Tiling::padded_size`]), so a
//! tile reads its patch without bounds checks. Tiles go in *bands* of whole tile rows that keep
//! the transformed patches and products in cache; each band's 16 products run in parallel.

use rayon::prelude::*;

use crate::model::gemm::{MatRef, matmul_into};
use crate::model::kernels::{signed_sum4, winograd_output_tile};

/// The kernel `[O, C, 3, 3]` transformed: 16 matrices `[C, O]`, one per position of the 4×4
/// transform.
pub struct WinogradKernel {
    c: usize,
    o: usize,
    u: Vec<f32>,
}

/// `G v` for one row or column `v` of a 3×3 kernel: `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
fn kernel_transform(v: [f32; 3]) -> [f32; 4] {
    [v[0], 0.5 * (v[0] + v[1] + v[2]), 0.5 * (v[0] - v[1] + v[2]), v[2]]
}

impl WinogradKernel {
    /// From the kernel's values in `[O, C, 3, 3]` order.
    pub fn new(w: &[f32], o: usize, c: usize) -> Self {
        assert_eq!(w.len(), o * c * 9, "WinogradKernel: kernel of {} values for [{o}, {c}, 3, 3]", w.len());
        let mut u = vec![0f32; 16 * c * o];
        for (oi, filter) in w.chunks_exact(c * 9).enumerate() {
            for (ci, g) in filter.chunks_exact(9).enumerate() {
                // G g (4 rows of 3), then (G g) Gᵀ row by row.
                let columns: [[f32; 4]; 3] = std::array::from_fn(|j| kernel_transform([g[j], g[3 + j], g[6 + j]]));
                for i in 0..4 {
                    let row = kernel_transform([columns[0][i], columns[1][i], columns[2][i]]);
                    for (j, &v) in row.iter().enumerate() {
                        u[((4 * i + j) * c + ci) * o + oi] = v;
                    }
                }
            }
        }
        WinogradKernel { c, o, u }
    }

    /// The `[C, O]` matrix of transform position `xi`.
    fn position(&self, xi: usize) -> MatRef<'_> {
        let (c, o) = (self.c, self.o);
        MatRef { data: &self.u[xi * c * o..][..c * o], rows: c, cols: o, row_stride: o, col_stride: 1 }
    }
}

impl std::fmt::Debug for WinogradKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WinogradKernel[{}, {}]", self.o, self.c)
    }
}

/// Rows of `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]` as its two
/// nonzero entries (index, sign): position `(i, j)` of `Bᵀ d B` sums four patch values.
const INPUT_TERMS: [[(usize, f32); 2]; 4] = [[(0, 1.0), (2, -1.0)], [(1, 1.0), (2, 1.0)], [(2, 1.0), (1, -1.0)], [(1, 1.0), (3, -1.0)]];

/// How an output of `b` images of `ho × wo` pixels splits into 2×2 tiles.
#[derive(Clone, Copy, Debug)]
pub struct Tiling {
    pub b: usize,
    pub ho: usize,
    pub wo: usize,
    tiles_h: usize,
    tiles_w: usize,
}

impl Tiling {
    pub fn new(b: usize, ho: usize, wo: usize) -> Self {
        Tiling { b, ho, wo, tiles_h: ho.div_ceil(2), tiles_w: wo.div_ceil(2) }
    }

    /// The padded input every tile reads: `(Hp, Wp)` = two more than the tiles cover, which is
    /// at least the input plus its padding on both sides (one more row or column when the
    /// output's size is odd; those extra values must be zero).
    pub fn padded_size(&self) -> (usize, usize) {
        (2 * self.tiles_h + 2, 2 * self.tiles_w + 2)
    }

    /// The first output pixel (over the whole batch) of tile row `row` (over the whole batch).
    fn first_pixel(&self, row: usize) -> usize {
        let (b, ty) = (row / self.tiles_h, row % self.tiles_h);
        (b * self.ho + 2 * ty) * self.wo
    }
}

/// Floats of transformed patches and products per band (8 MiB): they stay in the last-level
/// cache while the band's 16 products run.
const BAND_FLOATS: usize = 1 << 21;

/// Convolves the padded channels-last input `xp [B, Hp, Wp, C]` with `kernel`, band by band.
/// For each band `emit(p0, y)` receives its output pixel-major: `y [n, O]` for the output
/// pixels `p0..p0+n` of the whole batch (in `[B, Ho, Wo]` order).
pub fn convolve(kernel: &WinogradKernel, xp: &[f32], tiling: &Tiling, emit: impl FnMut(usize, &mut [f32])) {
    let band_tiles = (BAND_FLOATS / (16 * (kernel.c + kernel.o))).max(1);
    convolve_in_bands(kernel, xp, tiling, band_tiles, emit)
}

/// [`convolve`] with at most `band_tiles` tiles per band (at least one tile row).
fn convolve_in_bands(kernel: &WinogradKernel, xp: &[f32], t: &Tiling, band_tiles: usize, mut emit: impl FnMut(usize, &mut [f32])) {
    let (c, o) = (kernel.c, kernel.o);
    let (hp, wp) = t.padded_size();
    assert_eq!(xp.len(), t.b * hp * wp * c, "winograd: padded input of {} values for {t:?}", xp.len());
    let rows_total = t.b * t.tiles_h;
    if rows_total == 0 || t.tiles_w == 0 {
        return;
    }
    let band_rows = (band_tiles / t.tiles_w).clamp(1, rows_total);
    let max_tiles = band_rows * t.tiles_w;
    let mut v = vec![0f32; 16 * max_tiles * c];
    let mut m = vec![0f32; 16 * max_tiles * o];
    let mut y = vec![0f32; 2 * band_rows * t.wo * o];
    let patch = |row: usize, tx: usize, dy: usize, dx: usize| -> &[f32] {
        let (b, ty) = (row / t.tiles_h, row % t.tiles_h);
        &xp[((b * hp + 2 * ty + dy) * wp + 2 * tx + dx) * c..][..c]
    };
    for r0 in (0..rows_total).step_by(band_rows) {
        let r1 = (r0 + band_rows).min(rows_total);
        let tiles = (r1 - r0) * t.tiles_w;
        // One task per transform position: its patch values for every tile, then its product.
        v.par_chunks_mut(max_tiles * c).zip(m.par_chunks_mut(max_tiles * o)).enumerate().for_each(|(xi, (v, m))| {
            let ([(ra, sa), (rb, sb)], [(ca, ta), (cb, tb)]) = (INPUT_TERMS[xi / 4], INPUT_TERMS[xi % 4]);
            for (i, dst) in v[..tiles * c].chunks_exact_mut(c).enumerate() {
                let (row, tx) = (r0 + i / t.tiles_w, i % t.tiles_w);
                let at = |dy, dx| patch(row, tx, dy, dx);
                signed_sum4(dst, at(ra, ca), at(ra, cb), at(rb, ca), at(rb, cb), [sa * ta, sa * tb, sb * ta, sb * tb]);
            }
            let lhs = MatRef { data: &v[..tiles * c], rows: tiles, cols: c, row_stride: c, col_stride: 1 };
            matmul_into(&mut m[..tiles * o], o, lhs, kernel.position(xi));
        });
        // Output transform, one task per tile row: its (one or two) rows of output pixels.
        let p0 = t.first_pixel(r0);
        let n = t.first_pixel(r1) - p0;
        let mut rest = &mut y[..n * o];
        let mut rows = Vec::with_capacity(r1 - r0);
        for row in r0..r1 {
            let (this, tail) = rest.split_at_mut((t.first_pixel(row + 1) - t.first_pixel(row)) * o);
            rows.push((row, this));
            rest = tail;
        }
        let m = &m;
        rows.into_par_iter().for_each(|(row, dst)| {
            let mut tile = vec![0f32; 4 * o];
            let out_rows = dst.len() / (t.wo * o);
            for tx in 0..t.tiles_w {
                let i = (row - r0) * t.tiles_w + tx;
                winograd_output_tile(&m[i * o..], max_tiles * o, o, &mut tile);
                for dy in 0..out_rows {
                    for dx in 0..2.min(t.wo - 2 * tx) {
                        let px = dy * t.wo + 2 * tx + dx;
                        dst[px * o..(px + 1) * o].copy_from_slice(&tile[(2 * dy + dx) * o..][..o]);
                    }
                }
            }
        });
        emit(p0, &mut y[..n * o]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition in f64: `y[b, oy, ox, o] = Σ x[b, oy + ky, ox + kx, c] · w[o, c, ky, kx]`
    /// over the padded input.
    fn direct(xp: &[f32], w: &[f32], t: &Tiling, c: usize, o: usize) -> Vec<f64> {
        let (hp, wp) = t.padded_size();
        let mut y = vec![0f64; t.b * t.ho * t.wo * o];
        for b in 0..t.b {
            for oy in 0..t.ho {
                for ox in 0..t.wo {
                    for oi in 0..o {
                        let mut s = 0f64;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let xv = xp[((b * hp + oy + ky) * wp + ox + kx) * c + ci] as f64;
                                    s += xv * w[((oi * c + ci) * 3 + ky) * 3 + kx] as f64;
                                }
                            }
                        }
                        y[((b * t.ho + oy) * t.wo + ox) * o + oi] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn tiles_and_bands_reproduce_the_direct_convolution() {
        let mut rng = crate::model::noise::Rng::new(5);
        // Odd and even sizes, one-pixel images, bands of one tile row and of several images.
        for (b, ho, wo, c, o, band_tiles) in [(2, 6, 8, 5, 7, 1000), (3, 5, 7, 4, 3, 4), (1, 1, 1, 2, 2, 1), (2, 9, 4, 17, 6, 5), (1, 3, 10, 3, 33, 11)] {
            let t = Tiling::new(b, ho, wo);
            let (hp, wp) = t.padded_size();
            // Random values inside the image (including its padding), zeros beyond.
            let mut xp = vec![0f32; b * hp * wp * c];
            for bi in 0..b {
                for yy in 0..ho + 2 {
                    for xx in 0..wo + 2 {
                        for ci in 0..c {
                            xp[((bi * hp + yy) * wp + xx) * c + ci] = rng.normal() as f32;
                        }
                    }
                }
            }
            let w: Vec<f32> = (0..o * c * 9).map(|_| rng.normal() as f32).collect();
            let kernel = WinogradKernel::new(&w, o, c);
            let mut got = vec![f32::NAN; b * ho * wo * o];
            let mut bands = 0;
            convolve_in_bands(&kernel, &xp, &t, band_tiles, |p0, y| {
                got[p0 * o..p0 * o + y.len()].copy_from_slice(y);
                bands += 1;
            });
            assert!(bands >= 1);
            let want = direct(&xp, &w, &t, c, o);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{b}x{ho}x{wo} c{c} o{o} bands of {band_tiles}: element {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn small_bands_split_the_work() {
        // One tile row per band: 3 images × 2 tile rows = 6 bands, each a contiguous pixel range.
        let t = Tiling::new(3, 4, 6);
        let (hp, wp) = t.padded_size();
        let kernel = WinogradKernel::new(&[0.5; 2 * 2 * 9], 2, 2);
        let xp = vec![1f32; 3 * hp * wp * 2];
        let mut starts = Vec::new();
        convolve_in_bands(&kernel, &xp, &t, 1, |p0, y| starts.push((p0, y.len() / 2)));
        assert_eq!(starts, vec![(0, 12), (12, 12), (24, 12), (36, 12), (48, 12), (60, 12)]);
    }
}
