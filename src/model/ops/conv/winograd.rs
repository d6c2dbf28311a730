//! Winograd's minimal filtering F(4×4, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2016) for the 3×3, stride-1 convolutions that do most of a UNet's and a
//! VAE's work.
//!
//! Each 4×4 block of output pixels (a *tile*) comes from the 6×6 input patch under it as
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`. The kernel's transform `G g Gᵀ` is made per call (see
//! [`WinogradKernel`]); the patch's transform `Bᵀ d B` and the output's `Aᵀ · A` are sums with
//! small integer weights. Summed over input channels, the element-wise products become 36 matrix products
//! `[tiles, C] × [C, O]`: 36 multiplications per 16 output pixels where im2col + gemm needs 144
//! (4× fewer; F(2×2, 3×3), which this replaced, saves 2.25×), and the transformed patches and
//! products per output pixel shrink by the same ratio (2.25 against 4 values per channel), which
//! matters as much at a VAE's 32-128 channels, where those passes are memory-bound. The larger
//! weights round more: the tests bound the difference to the direct convolution.
//!
//! The input is channels-last and already zero-padded (see [`Tiling::padded_size`]), so a
//! tile reads its patch without bounds checks. Tiles go in *bands* of whole tile rows that keep
//! the transformed patches and products in cache; per band the input transform runs in
//! parallel over tiles (each tile's 36 values at once, sharing the separable transform's
//! partial sums), then the 36 products in parallel.

use rayon::prelude::*;

use crate::model::gemm::{MatRef, matmul_into};
use crate::model::kernels::{weighted_sum, winograd_input_tiles, winograd_kernel_rows, winograd_output_tile};

/// Output pixels per tile side.
const TILE: usize = 4;
/// Input pixels per patch side.
const PATCH: usize = TILE + 2;
/// Positions of the transform (`PATCH²`): products per band.
const POSITIONS: usize = PATCH * PATCH;

/// `G`: the kernel's rows (or columns) for transform row `i`.
const G: [[f64; 3]; PATCH] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// A 3×3 kernel for Winograd, borrowed in its pixel-major layout `[9·C, O]` (tap `(a, b)` is
/// the `[C, O]` plane `3a + b`), the layout im2col keeps anyway. The 36 transformed matrices
/// `G g Gᵀ` are made per convolution and dropped after it: caching them took 4× the kernel's
/// memory (55 MB for tiny-sd's UNet, gigabytes at SD 1.5's size). Made all at once
/// ([`winograd_kernel_rows`]) each kernel value is read once and costs about 3 operations per
/// position; one position at a time (when all 36 would not fit the scratch) each is a weighted
/// sum of up to nine planes.
pub struct WinogradKernel<'a> {
    c: usize,
    o: usize,
    planes: &'a [f32],
}

impl<'a> WinogradKernel<'a> {
    /// From the pixel-major kernel `[9·C, O]`.
    pub fn new(planes: &'a [f32], o: usize, c: usize) -> Self {
        assert_eq!(planes.len(), 9 * c * o, "WinogradKernel: kernel of {} values for [9·{c}, {o}]", planes.len());
        WinogradKernel { c, o, planes }
    }

    /// The `[C, O]` matrix of transform position `xi` (`Σ G[i][a]·G[j][b]·plane(a, b)`) into `dst`.
    fn position_into(&self, xi: usize, dst: &mut [f32]) {
        let (i, j, n) = (xi / PATCH, xi % PATCH, self.c * self.o);
        let mut srcs = Vec::with_capacity(9);
        let mut coeffs = Vec::with_capacity(9);
        for (a, &ga) in G[i].iter().enumerate() {
            for (b, &gb) in G[j].iter().enumerate() {
                if ga * gb != 0.0 {
                    srcs.push(&self.planes[(3 * a + b) * n..][..n]);
                    coeffs.push((ga * gb) as f32);
                }
            }
        }
        weighted_sum(&mut dst[..n], &srcs, &coeffs);
    }
}

/// How an output of `b` images of `ho × wo` pixels splits into 4×4 tiles.
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
        Tiling { b, ho, wo, tiles_h: ho.div_ceil(TILE), tiles_w: wo.div_ceil(TILE) }
    }

    /// Tiles over the whole batch.
    pub fn tiles(&self) -> usize {
        self.b * self.tiles_h * self.tiles_w
    }

    /// The padded input every tile reads: `(Hp, Wp)` = two more than the tiles cover, which is
    /// at least the input plus its padding on both sides (up to three more rows or columns
    /// when the output's size is not a multiple of 4; those extra values must be zero).
    pub fn padded_size(&self) -> (usize, usize) {
        (TILE * self.tiles_h + 2, TILE * self.tiles_w + 2)
    }

    /// The first output pixel (over the whole batch) of tile row `row` (over the whole batch).
    fn first_pixel(&self, row: usize) -> usize {
        let (b, ty) = (row / self.tiles_h, row % self.tiles_h);
        (b * self.ho + TILE * ty) * self.wo
    }
}

/// Floats of transformed patches and products per band (8 MiB): they stay in the last-level
/// cache while the band's products run.
const BAND_FLOATS: usize = 1 << 21;

/// Floats of a whole kernel transform (all 36 positions) kept in the per-thread scratch (8 MiB:
/// up to 58 Ki kernel values, every layer of tiny-sd; SD 1.5's 320-channel layers and up make
/// each position on its own, or allocate the whole transform when several bands share it).
const WHOLE_KERNEL_FLOATS: usize = 1 << 21;

/// Convolves the padded channels-last input `xp [B, Hp, Wp, C]` with `kernel`, band by band.
/// For each band `emit(p0, y)` receives its output pixel-major: `y [n, O]` for the output
/// pixels `p0..p0+n` of the whole batch (in `[B, Ho, Wo]` order).
pub fn convolve(kernel: &WinogradKernel, xp: &[f32], tiling: &Tiling, emit: impl FnMut(usize, &mut [f32])) {
    let band_tiles = (BAND_FLOATS / (POSITIONS * (kernel.c + kernel.o))).max(1);
    convolve_in_bands(kernel, xp, tiling, band_tiles, WHOLE_KERNEL_FLOATS, emit)
}

/// [`convolve`] with at most `band_tiles` tiles per band (at least one tile row), and a whole
/// kernel transform in the scratch up to `kernel_in_scratch` floats.
fn convolve_in_bands(kernel: &WinogradKernel, xp: &[f32], t: &Tiling, band_tiles: usize, kernel_in_scratch: usize, mut emit: impl FnMut(usize, &mut [f32])) {
    let (c, o) = (kernel.c, kernel.o);
    let (hp, wp) = t.padded_size();
    assert_eq!(xp.len(), t.b * hp * wp * c, "winograd: padded input of {} values for {t:?}", xp.len());
    let rows_total = t.b * t.tiles_h;
    if rows_total == 0 || t.tiles_w == 0 {
        return;
    }
    let band_rows = (band_tiles / t.tiles_w).clamp(1, rows_total);
    let max_tiles = band_rows * t.tiles_w;
    // Transformed patches tile-major (`[tiles, 36, C]`: each task transforms whole tiles);
    // products position-major (`[36, tiles, O]`: each task owns one position's product).
    // The transformed kernel is made whole (`[C, 36, O]`: each task makes whole input channels)
    // when it fits the scratch, or when several bands multiply by it (then allocated for the
    // call); otherwise each position is made by the task that multiplies by it, into a buffer
    // that stays in cache.
    let whole_len = POSITIONS * c * o;
    let in_scratch = whole_len <= kernel_in_scratch;
    let whole = in_scratch || rows_total > band_rows;
    let mut allocated = Vec::new();
    let (v_len, m_len, y_len) = (max_tiles * POSITIONS * c, POSITIONS * max_tiles * o, TILE * band_rows * t.wo * o);
    with_scratch(if in_scratch { whole_len } else { 0 } + v_len + m_len + y_len, |scratch| {
        let (u, rest) = scratch.split_at_mut(if in_scratch { whole_len } else { 0 });
        let u: &mut [f32] = match (in_scratch, whole) {
            (true, _) => u,
            (false, true) => {
                allocated = vec![0f32; whole_len];
                &mut allocated
            }
            (false, false) => &mut [],
        };
        if whole {
            let channels_per_task = c.div_ceil(4 * rayon::current_num_threads().max(1)).max(1);
            u.par_chunks_mut(channels_per_task * POSITIONS * o).enumerate().for_each(|(i, u)| {
                winograd_kernel_rows(u, kernel.planes, c, o, i * channels_per_task);
            });
        }
        let u = &*u;
        let (v, rest) = rest.split_at_mut(v_len);
        let (m, y) = rest.split_at_mut(m_len);
        let mut bases = Vec::with_capacity(max_tiles);
        let tiles_per_task = (max_tiles / (4 * rayon::current_num_threads().max(1))).max(1);
        for r0 in (0..rows_total).step_by(band_rows) {
            let r1 = (r0 + band_rows).min(rows_total);
            let tiles = (r1 - r0) * t.tiles_w;
            bases.clear();
            for row in r0..r1 {
                let (b, ty) = (row / t.tiles_h, row % t.tiles_h);
                bases.extend((0..t.tiles_w).map(|tx| ((b * hp + TILE * ty) * wp + TILE * tx) * c));
            }
            v[..tiles * POSITIONS * c].par_chunks_mut(tiles_per_task * POSITIONS * c).zip(bases.par_chunks(tiles_per_task)).for_each(|(v, bases)| {
                winograd_input_tiles(v, xp, bases, wp * c, c);
            });
            let v = &*v;
            m.par_chunks_mut(max_tiles * o).enumerate().for_each_init(Vec::new, |own_u, (xi, m)| {
                let rhs = if whole {
                    MatRef { data: &u[xi * o..], rows: c, cols: o, row_stride: POSITIONS * o, col_stride: 1 }
                } else {
                    own_u.resize(c * o, 0.0);
                    kernel.position_into(xi, own_u);
                    MatRef { data: &own_u[..], rows: c, cols: o, row_stride: o, col_stride: 1 }
                };
                let lhs = MatRef { data: &v[xi * c..], rows: tiles, cols: c, row_stride: POSITIONS * c, col_stride: 1 };
                matmul_into(&mut m[..tiles * o], o, lhs, rhs);
            });
            // Output transform, one task per tile row: its (up to four) rows of output pixels.
            let p0 = t.first_pixel(r0);
            let n = t.first_pixel(r1) - p0;
            let mut rest = &mut y[..n * o];
            let mut rows = Vec::with_capacity(r1 - r0);
            for row in r0..r1 {
                let (this, tail) = rest.split_at_mut((t.first_pixel(row + 1) - t.first_pixel(row)) * o);
                rows.push((row, this));
                rest = tail;
            }
            let m = &*m;
            rows.into_par_iter().for_each(|(row, dst)| {
                let mut tile = vec![0f32; TILE * TILE * o];
                let out_rows = dst.len() / (t.wo * o);
                for tx in 0..t.tiles_w {
                    let i = (row - r0) * t.tiles_w + tx;
                    winograd_output_tile(&m[i * o..], max_tiles * o, o, &mut tile);
                    let cols = TILE.min(t.wo - TILE * tx);
                    for dy in 0..out_rows {
                        let px = dy * t.wo + TILE * tx;
                        dst[px * o..(px + cols) * o].copy_from_slice(&tile[TILE * dy * o..][..cols * o]);
                    }
                }
            });
            emit(p0, &mut y[..n * o]);
        }
    });
}

thread_local! {
    /// Scratch for [`convolve`]'s transformed patches, products and output rows, kept per thread
    /// between calls: every element is written before it is read, and a fresh zeroed buffer
    /// (several MB per convolution) was a memset per call, about 3 % of a txt2img run.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's kept scratch (grown when needed), or on a fresh
/// buffer when the scratch is already in use further up this thread's stack (a rayon worker
/// can pick up another convolution while it waits).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => {
            if kept.len() < len {
                kept.resize(len, 0.0);
            }
            f(&mut kept[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

/// `Bᵀ`: row `i` weights the patch's rows (or columns) for transform row `i`.
const BT: [[f32; PATCH]; PATCH] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];

    #[test]
    fn the_input_transform_is_bt_d_b() {
        // Two tiles of a 7-channel input (a full 16-lane block is not needed: the tail path is
        // the same arithmetic), read from a larger frame.
        let mut rng = crate::model::noise::Rng::new(9);
        let (c, wp) = (7, 9);
        let src: Vec<f32> = (0..8 * wp * c).map(|_| rng.normal() as f32).collect();
        let bases = [0, (wp + 3) * c];
        let mut got = vec![0f32; 2 * POSITIONS * c];
        winograd_input_tiles(&mut got, &src, &bases, wp * c, c);
        for (t, &base) in bases.iter().enumerate() {
            for (i, j, k) in (0..PATCH).flat_map(|i| (0..PATCH).flat_map(move |j| (0..c).map(move |k| (i, j, k)))) {
                let mut want = 0f64;
                for a in 0..PATCH {
                    for b in 0..PATCH {
                        want += (BT[i][a] * BT[j][b]) as f64 * src[base + a * wp * c + b * c + k] as f64;
                    }
                }
                let g = got[(t * POSITIONS + PATCH * i + j) * c + k] as f64;
                assert!((g - want).abs() < 1e-4 * (1.0 + want.abs()), "tile {t} ({i}, {j}) channel {k}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn the_kernel_transform_is_g_g_gt_both_ways() {
        // 5 input and 19 output channels (a full 16-lane block and a tail).
        let mut rng = crate::model::noise::Rng::new(4);
        let (c, o) = (5, 19);
        let planes: Vec<f32> = (0..9 * c * o).map(|_| rng.normal() as f32).collect();
        let kernel = WinogradKernel::new(&planes, o, c);
        let want = |ci: usize, xi: usize, oi: usize| -> f64 {
            let (i, j) = (xi / PATCH, xi % PATCH);
            let mut s = 0f64;
            for a in 0..3 {
                for b in 0..3 {
                    s += G[i][a] * G[j][b] * planes[((3 * a + b) * c + ci) * o + oi] as f64;
                }
            }
            s
        };
        // Whole, from input channel 2 on.
        let mut whole = vec![f32::NAN; 3 * POSITIONS * o];
        winograd_kernel_rows(&mut whole, &planes, c, o, 2);
        // One position at a time.
        let mut one = vec![f32::NAN; c * o];
        for xi in 0..POSITIONS {
            kernel.position_into(xi, &mut one);
            for ci in 0..c {
                for oi in 0..o {
                    let w = want(ci, xi, oi);
                    let g = one[ci * o + oi] as f64;
                    assert!((g - w).abs() < 1e-6 * (1.0 + w.abs()), "position {xi} ({ci}, {oi}) alone: {g} vs {w}");
                    if ci >= 2 {
                        let g = whole[((ci - 2) * POSITIONS + xi) * o + oi] as f64;
                        assert!((g - w).abs() < 1e-6 * (1.0 + w.abs()), "position {xi} ({ci}, {oi}) whole: {g} vs {w}");
                    }
                }
            }
        }
    }

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

    /// `[O, C, 3, 3]` → `[9·C, O]`.
    fn pixel_major(w: &[f32], o: usize, c: usize) -> Vec<f32> {
        let mut planes = vec![0f32; w.len()];
        for oi in 0..o {
            for ci in 0..c {
                for tap in 0..9 {
                    planes[(tap * c + ci) * o + oi] = w[(oi * c + ci) * 9 + tap];
                }
            }
        }
        planes
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
            let planes = pixel_major(&w, o, c);
            let kernel = WinogradKernel::new(&planes, o, c);
            let want = direct(&xp, &w, &t, c, o);
            // The kernel transform made whole in the scratch, or one position per task.
            for kernel_in_scratch in [usize::MAX, 0] {
                let mut got = vec![f32::NAN; b * ho * wo * o];
                let mut bands = 0;
                convolve_in_bands(&kernel, &xp, &t, band_tiles, kernel_in_scratch, |p0, y| {
                    got[p0 * o..p0 * o + y.len()].copy_from_slice(y);
                    bands += 1;
                });
                assert!(bands >= 1);
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!((g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{b}x{ho}x{wo} c{c} o{o} bands of {band_tiles}, kernel in scratch up to {kernel_in_scratch}: element {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn scratch_is_kept_and_a_nested_call_gets_its_own() {
        let outer = with_scratch(8, |a| {
            a.fill(1.0);
            let inner = with_scratch(8, |b| {
                b.fill(2.0);
                b.as_ptr()
            });
            assert_ne!(inner, a.as_ptr(), "a nested call must not share the buffer in use");
            assert!(a.iter().all(|&v| v == 1.0));
            a.as_ptr()
        });
        // The next call on this thread reuses the kept buffer.
        assert_eq!(with_scratch(4, |a| a.as_ptr()), outer);
    }

    #[test]
    fn small_bands_split_the_work() {
        // One tile row per band: 3 images × 1 tile row = 3 bands, each a contiguous pixel range.
        let t = Tiling::new(3, 4, 6);
        let (hp, wp) = t.padded_size();
        let planes = [0.5; 2 * 2 * 9];
        let kernel = WinogradKernel::new(&planes, 2, 2);
        let xp = vec![1f32; 3 * hp * wp * 2];
        let mut starts = Vec::new();
        convolve_in_bands(&kernel, &xp, &t, 1, WHOLE_KERNEL_FLOATS, |p0, y| starts.push((p0, y.len() / 2)));
        assert_eq!(starts, vec![(0, 24), (24, 24), (48, 24)]);
    }
}
