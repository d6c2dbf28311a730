//! Element-wise math on `f32` slices for the fused CPU kernels.
//!
//! libm's `expf` and `erff` are scalar calls and were about a sixth of all CPU time (softmax,
//! SiLU, GELU). The versions here are branch-free so that LLVM vectorises the loops that call
//! them, and every public function runs an AVX-512 or AVX2+FMA build of its loop when the CPU
//! has one.
//! Accuracy: `exp` is within about 2 ulp; the GELU's erf is within 1.5e-7 (absolute).

/// Defines `pub fn $name(args)` that runs `$body` compiled for AVX-512 or AVX2+FMA when available, else
/// for the baseline target. Inside `$body`, `FMA` is a const bool: use [`madd`] with it.
macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn imp<const FMA: bool>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                // The same loops compiled for 512-bit vectors (explicit AVX2 intrinsics stay
                // 256-bit), on CPUs that have AVX-512.
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($a: $t),*) $(-> $r)? {
                    imp::<true>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($a: $t),*) $(-> $r)? {
                    imp::<true>($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `wide` is compiled for.
                    return unsafe { wide($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `fast` is compiled for.
                    return unsafe { fast($($a),*) };
                }
            }
            imp::<false>($($a),*)
        }
    };
}

/// `a * b + c`, fused when the build has FMA (a libm call otherwise, so not then).
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `e^x` for `x` in about [-87, 88]; 0 below, finite above.
#[inline(always)]
pub fn exp<const FMA: bool>(x: f32) -> f32 {
    // e^x = 2^n · e^r with n = round(x / ln 2) and |r| <= ln 2 / 2.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HI is exact for |n| < 2^11.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = madd::<FMA>(xc, LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, xc));
    // Taylor series to r^7: truncation error below 5e-9 on |r| <= 0.35.
    let mut p = 1.0 / 5040.0;
    p = madd::<FMA>(p, r, 1.0 / 720.0);
    p = madd::<FMA>(p, r, 1.0 / 120.0);
    p = madd::<FMA>(p, r, 1.0 / 24.0);
    p = madd::<FMA>(p, r, 1.0 / 6.0);
    p = madd::<FMA>(p, r, 0.5);
    p = madd::<FMA>(p, r, 1.0);
    p = madd::<FMA>(p, r, 1.0);
    let ni = t.to_bits().wrapping_sub(SHIFTER.to_bits()) as i32;
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    let y = p * scale;
    if x < -87.0 { 0.0 } else { y }
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu<const FMA: bool>(x: f32) -> f32 {
    x / (1.0 + exp::<FMA>(-x))
}

/// erf from Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline(always)]
pub fn erf<const FMA: bool>(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / madd::<FMA>(0.327_591_1, z, 1.0);
    let mut p = 1.061_405_4;
    p = madd::<FMA>(p, t, -1.453_152);
    p = madd::<FMA>(p, t, 1.421_413_7);
    p = madd::<FMA>(p, t, -0.284_496_74);
    p = madd::<FMA>(p, t, 0.254_829_6);
    let erf_abs = 1.0 - p * t * exp::<FMA>(-z * z);
    if x < 0.0 { -erf_abs } else { erf_abs }
}

/// Exact GELU, `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// The exact GELU and its derivative `Φ(x) + x·φ(x)` (φ with the exact 1/√(2π), unlike
/// candle's `GeluErf` backward).
#[inline(always)]
pub fn gelu_erf_and_grad<const FMA: bool>(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = INV_SQRT_2PI * exp::<FMA>(-0.5 * x * x);
    (x * cdf, madd::<FMA>(x, pdf, cdf))
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid<const FMA: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<FMA>(-x))
}

/// `x ← x + a`, element-wise.
#[inline]
pub fn add_rows(x: &mut [f32], a: &[f32]) {
    for (v, &b) in x.iter_mut().zip(a) {
        *v += b;
    }
}

dispatch! {
    /// `x ← x · scale + shift`, then SiLU when `act`.
    pub fn affine_into(src: &[f32], dst: &mut [f32], scale: f32, shift: f32, act: bool) {
        if act {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = silu::<FMA>(madd::<FMA>(v, scale, shift));
            }
        } else {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = madd::<FMA>(v, scale, shift);
            }
        }
    }
}

dispatch! {
    /// GEGLU on rows of `h = [hidden | gate]`: `out = hidden · gelu(gate)`, `out` one row per
    /// `h` row, `width` wide (half of `h`'s rows).
    pub fn geglu_rows(h: &[f32], out: &mut [f32], width: usize) {
        for (o, row) in out.chunks_exact_mut(width).zip(h.chunks_exact(2 * width)) {
            let (hidden, gate) = row.split_at(width);
            for ((d, &a), &g) in o.iter_mut().zip(hidden).zip(gate) {
                *d = a * gelu_erf::<FMA>(g);
            }
        }
    }
}

dispatch! {
    /// The backward pass of [`geglu_rows`]: from the output's gradient `g` (rows of `width`)
    /// and the input `h`, the input's gradient `dh` (rows of `2 · width`).
    pub fn geglu_rows_backward(h: &[f32], g: &[f32], dh: &mut [f32], width: usize) {
        for ((d, row), gr) in dh.chunks_exact_mut(2 * width).zip(h.chunks_exact(2 * width)).zip(g.chunks_exact(width)) {
            let (hidden, gate) = row.split_at(width);
            let (d_hidden, d_gate) = d.split_at_mut(width);
            for i in 0..width {
                let (act, slope) = gelu_erf_and_grad::<FMA>(gate[i]);
                d_hidden[i] = gr[i] * act;
                d_gate[i] = gr[i] * hidden[i] * slope;
            }
        }
    }
}

dispatch! {
    /// First half of a normalisation's backward pass over one channel's (or row's) values:
    /// with `x̂ = (x - mean)·inv` (`stats`) and `z = x̂·scale + shift` (`affine`), writes `∂L/∂x̂ = g · act'(z) · scale`
    /// (act is SiLU when `silu`, else the identity) into `dxhat` and returns the sums of
    /// `∂L/∂x̂` and of `∂L/∂x̂ · x̂`.
    pub fn norm_grad_sums(x: &[f32], g: &[f32], dxhat: &mut [f32], stats: (f32, f32), affine: (f32, f32), silu: bool) -> (f64, f64) {
        let ((mean, inv), (scale, shift)) = (stats, affine);
        let (mut s1, mut s2) = (0f64, 0f64);
        for ((d, &xv), &gv) in dxhat.iter_mut().zip(x).zip(g) {
            let xhat = (xv - mean) * inv;
            let mut dz = gv;
            if silu {
                let z = madd::<FMA>(xhat, scale, shift);
                let s = sigmoid::<FMA>(z);
                dz *= s * madd::<FMA>(z, 1.0 - s, 1.0);
            }
            let v = dz * scale;
            *d = v;
            s1 += v as f64;
            s2 += (v * xhat) as f64;
        }
        (s1, s2)
    }
}

dispatch! {
    /// Second half: `∂L/∂x = inv · (∂L/∂x̂ - m1 - x̂ · m2)` in place, with `m1`, `m2` the means
    /// of `∂L/∂x̂` and `∂L/∂x̂ · x̂` over the normalised group.
    pub fn norm_grad_finish(x: &[f32], dxhat: &mut [f32], mean: f32, inv: f32, m1: f32, m2: f32) {
        for (d, &xv) in dxhat.iter_mut().zip(x) {
            let xhat = (xv - mean) * inv;
            *d = inv * (*d - m1 - xhat * m2);
        }
    }
}

/// Sum with eight independent accumulators, so that the loop vectorises.
#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum with eight independent accumulators (see [`sum_lanes`]).
#[inline(always)]
fn max_lanes(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// In-place softmax of one row of `x · scale`.
#[inline(always)]
fn softmax_row<const FMA: bool>(row: &mut [f32], scale: f32) {
    let max = max_lanes(row);
    // A row of -inf (fully masked) would give 0/0; shift by 0 instead.
    let shift = if max.is_finite() { max * scale } else { 0.0 };
    for v in row.iter_mut() {
        *v = exp::<FMA>(madd::<FMA>(*v, scale, -shift));
    }
    let inv = 1.0 / sum_lanes(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

dispatch! {
    /// In-place softmax of `x · scale`, one row of length `width` at a time.
    pub fn softmax_rows(xs: &mut [f32], width: usize, scale: f32) {
        for row in xs.chunks_exact_mut(width) {
            softmax_row::<FMA>(row, scale);
        }
    }
}

dispatch! {
    /// The backward pass of [`softmax_rows`]: from the output `y` and its gradient `g`, the
    /// input's gradient `scale · y · (g - Σ g·y)`, row by row.
    pub fn softmax_rows_backward(y: &[f32], g: &[f32], dx: &mut [f32], width: usize, scale: f32) {
        for ((d, yr), gr) in dx.chunks_exact_mut(width).zip(y.chunks_exact(width)).zip(g.chunks_exact(width)) {
            let mut acc = [0f32; 8];
            let (yc, gc) = (yr.chunks_exact(8), gr.chunks_exact(8));
            let mut dot: f32 = yc.remainder().iter().zip(gc.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in yc.zip(gc) {
                for i in 0..8 {
                    acc[i] = madd::<FMA>(a[i], b[i], acc[i]);
                }
            }
            dot += acc.iter().sum::<f32>();
            for ((o, &yv), &gv) in d.iter_mut().zip(yr).zip(gr) {
                *o = scale * yv * (gv - dot);
            }
        }
    }
}

/// Queries per register block of [`attention_rows`].
const QB: usize = 4;
/// Keys (or value columns) per register block: two AVX vectors.
const KB: usize = 16;

/// One head's keys and values, laid out for [`attention_rows`].
pub struct HeadKv<'a> {
    /// Keys transposed, `[d, m_pad]`, zero beyond `m`.
    pub kt: &'a [f32],
    /// Values `[m, d_pad]`, zero beyond `d`.
    pub v: &'a [f32],
    pub m: usize,
    pub m_pad: usize,
    pub d: usize,
    pub d_pad: usize,
}

/// Padded sizes for [`HeadKv`].
pub fn attention_padding(m: usize, d: usize) -> (usize, usize) {
    (m.next_multiple_of(KB), d.next_multiple_of(KB))
}

/// `QB` query rows `qb [QB, d]` times keys `j0..j0+KB` of `kt [d, mp]`.
#[inline(always)]
fn scores_tile<const FMA: bool>(qb: &[f32], d: usize, kt: &[f32], mp: usize, j0: usize) -> [[f32; KB]; QB] {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        use std::arch::x86_64::*;
        assert!(d == 0 || (kt.len() >= (d - 1) * mp + j0 + KB && qb.len() >= QB * d));
        // SAFETY: FMA is only set in the AVX2+FMA build (see `dispatch!`); the assert bounds
        // every read.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 2 * QB];
            let (kp, qp) = (kt.as_ptr().add(j0), qb.as_ptr());
            for t in 0..d {
                let k = kp.add(t * mp);
                let (k0, k1) = (_mm256_loadu_ps(k), _mm256_loadu_ps(k.add(8)));
                for r in 0..QB {
                    let a = _mm256_broadcast_ss(&*qp.add(r * d + t));
                    acc[2 * r] = _mm256_fmadd_ps(a, k0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(a, k1, acc[2 * r + 1]);
                }
            }
            let mut out = [[0f32; KB]; QB];
            for r in 0..QB {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[2 * r]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[2 * r + 1]);
            }
            return out;
        }
    }
    let mut acc = [[0f32; KB]; QB];
    for t in 0..d {
        let k = &kt[t * mp + j0..][..KB];
        for r in 0..QB {
            let a = qb[r * d + t];
            for l in 0..KB {
                acc[r][l] = madd::<FMA>(a, k[l], acc[r][l]);
            }
        }
    }
    acc
}

/// `QB` probability rows (`p [QB, mp]`, first `m` used) times columns `c0..c0+KB` of
/// `v [m, dp]`.
#[inline(always)]
fn values_tile<const FMA: bool>(p: &[f32], mp: usize, m: usize, v: &[f32], dp: usize, c0: usize) -> [[f32; KB]; QB] {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        use std::arch::x86_64::*;
        assert!(m == 0 || (v.len() >= (m - 1) * dp + c0 + KB && p.len() >= (QB - 1) * mp + m));
        // SAFETY: as in `scores_tile`.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 2 * QB];
            let (vp, pp) = (v.as_ptr().add(c0), p.as_ptr());
            for j in 0..m {
                let x = vp.add(j * dp);
                let (v0, v1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
                for r in 0..QB {
                    let a = _mm256_broadcast_ss(&*pp.add(r * mp + j));
                    acc[2 * r] = _mm256_fmadd_ps(a, v0, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(a, v1, acc[2 * r + 1]);
                }
            }
            let mut out = [[0f32; KB]; QB];
            for r in 0..QB {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[2 * r]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[2 * r + 1]);
            }
            return out;
        }
    }
    let mut acc = [[0f32; KB]; QB];
    for j in 0..m {
        let x = &v[j * dp + c0..][..KB];
        for r in 0..QB {
            let a = p[r * mp + j];
            for l in 0..KB {
                acc[r][l] = madd::<FMA>(a, x[l], acc[r][l]);
            }
        }
    }
    acc
}

dispatch! {
    /// Attention of a run of query rows against one head: `q` holds `rows` queries of `d`
    /// values `q_stride` apart (already scaled), each output row of `d` values is written
    /// `o_stride` apart. Scores stay in a `QB × m` block in L1: no score matrix in memory, no
    /// head split or merge copies.
    pub fn attention_rows(q: &[f32], q_stride: usize, rows: usize, kv: &HeadKv<'_>, o: &mut [f32], o_stride: usize, scratch: &mut Vec<f32>) {
        let (m, mp, d, dp) = (kv.m, kv.m_pad, kv.d, kv.d_pad);
        scratch.resize(QB * mp + QB * d, 0.0);
        let (s, qb) = scratch.split_at_mut(QB * mp);
        for i0 in (0..rows).step_by(QB) {
            let nq = QB.min(rows - i0);
            for r in 0..QB {
                let dst = &mut qb[r * d..(r + 1) * d];
                if r < nq {
                    dst.copy_from_slice(&q[(i0 + r) * q_stride..][..d]);
                } else {
                    dst.fill(0.0);
                }
            }
            // Scores: a QB × KB register tile per step over d.
            for j0 in (0..mp).step_by(KB) {
                let acc = scores_tile::<FMA>(qb, d, kv.kt, mp, j0);
                for r in 0..QB {
                    s[r * mp + j0..][..KB].copy_from_slice(&acc[r]);
                }
            }
            for r in 0..nq {
                softmax_row::<FMA>(&mut s[r * mp..r * mp + m], 1.0);
            }
            // Probabilities times values: a QB × KB tile of the output per step over keys.
            for c0 in (0..dp).step_by(KB) {
                let acc = values_tile::<FMA>(s, mp, m, kv.v, dp, c0);
                let width = KB.min(d - c0);
                for r in 0..nq {
                    o[(i0 + r) * o_stride + c0..][..width].copy_from_slice(&acc[r][..width]);
                }
            }
        }    }
}

dispatch! {
    /// Sum and sum of squares in f64 (for normalisation statistics).
    pub fn moments(xs: &[f32]) -> (f64, f64) {
        let mut s = [0f64; 4];
        let mut q = [0f64; 4];
        let chunks = xs.chunks_exact(4);
        let (mut ts, mut tq) = (0f64, 0f64);
        for &v in chunks.remainder() {
            ts += v as f64;
            tq += v as f64 * v as f64;
        }
        for c in chunks {
            for i in 0..4 {
                let v = c[i] as f64;
                s[i] += v;
                q[i] += v * v;
            }
        }
        (s.iter().sum::<f64>() + ts, q.iter().sum::<f64>() + tq)
    }
}

/// Channels per register block of the Winograd transforms (one AVX-512 vector).
const WB: usize = 16;

dispatch! {
    /// `dst = Σᵢ coeffs[i] · srcs[i]`, element by element (every source at least as long as `dst`).
    pub fn weighted_sum(dst: &mut [f32], srcs: &[&[f32]], coeffs: &[f32]) {
        assert!(srcs.len() == coeffs.len() && srcs.iter().all(|s| s.len() >= dst.len()));
        let n = dst.len();
        let full = n / WB * WB;
        for k0 in (0..full).step_by(WB) {
            let mut acc = [0f32; WB];
            for (src, &w) in srcs.iter().zip(coeffs) {
                let s: &[f32; WB] = src[k0..k0 + WB].try_into().expect("block");
                for l in 0..WB {
                    acc[l] = madd::<FMA>(w, s[l], acc[l]);
                }
            }
            dst[k0..k0 + WB].copy_from_slice(&acc);
        }
        for k in full..n {
            dst[k] = srcs.iter().zip(coeffs).fold(0.0, |a, (src, &w)| madd::<FMA>(w, src[k], a));
        }
    }
}

/// `Bᵀ v` of F(4×4, 3×3) for six vectors `v` (a patch column or a row of the half-done
/// transform), with `Bᵀ`'s shared terms computed once: 12 operations per lane instead of 22.
#[inline(always)]
fn input_transform_6<const FMA: bool, const W: usize>(v: [[f32; W]; 6]) -> [[f32; W]; 6] {
    let mut t = [[0f32; W]; 6];
    for l in 0..W {
        let [d0, d1, d2, d3, d4, d5] = std::array::from_fn(|i| v[i][l]);
        let (s12, s34) = (d1 + d2, d3 + d4);
        let (m12, m43) = (d1 - d2, d4 - d3);
        let (d42, d31) = (d4 - d2, d3 - d1);
        t[0][l] = madd::<FMA>(4.0, d0, madd::<FMA>(-5.0, d2, d4));
        t[1][l] = madd::<FMA>(-4.0, s12, s34);
        t[2][l] = madd::<FMA>(4.0, m12, m43);
        t[3][l] = madd::<FMA>(2.0, d31, d42);
        t[4][l] = madd::<FMA>(-2.0, d31, d42);
        t[5][l] = madd::<FMA>(4.0, d1, madd::<FMA>(-5.0, d3, d5));
    }
    t
}

/// `Bᵀ d B` for `W` channels at `k0` of the 6×6 patch whose top-left pixel's channels start at
/// `src[base]` (rows `row_stride` apart, pixels `c` apart), into `dst[(6·i + j)·c + k0..]`.
#[inline(always)]
fn input_block<const FMA: bool, const W: usize>(src: &[f32], base: usize, row_stride: usize, c: usize, k0: usize, dst: &mut [f32]) {
    // Over the patch's rows for each column b: t[i][b] = Σₐ Bᵀ[i][a] · d[a][b].
    let mut t = [[[0f32; W]; 6]; 6];
    for b in 0..6 {
        let column: [[f32; W]; 6] = std::array::from_fn(|a| src[base + a * row_stride + b * c + k0..][..W].try_into().expect("block"));
        let tb = input_transform_6::<FMA, W>(column);
        for i in 0..6 {
            t[i][b] = tb[i];
        }
    }
    // Then over the columns of each row of t.
    for i in 0..6 {
        let row = input_transform_6::<FMA, W>(t[i]);
        for (j, v) in row.iter().enumerate() {
            dst[(6 * i + j) * c + k0..][..W].copy_from_slice(v);
        }
    }
}

dispatch! {
    /// The Winograd F(4×4, 3×3) input transform `Bᵀ d B` of a run of tiles: the patch of tile
    /// `t` starts at `src[bases[t]]` (its rows `row_stride` apart, its pixels `c` apart, channels
    /// contiguous); its 36 transformed rows of `c` values go to `dst[t·36·c..]`.
    pub fn winograd_input_tiles(dst: &mut [f32], src: &[f32], bases: &[usize], row_stride: usize, c: usize) {
        assert!(dst.len() >= bases.len() * 36 * c);
        let reach = 5 * row_stride + 6 * c;
        assert!(bases.iter().all(|&b| b + reach <= src.len()), "winograd_input_tiles: patch outside the input");
        let full = c / WB * WB;
        for (d, &base) in dst.chunks_exact_mut(36 * c).zip(bases) {
            for k0 in (0..full).step_by(WB) {
                input_block::<FMA, WB>(src, base, row_stride, c, k0, d);
            }
            for k0 in full..c {
                input_block::<FMA, 1>(src, base, row_stride, c, k0, d);
            }
        }
    }
}

/// `G v` of F(4×4, 3×3) for three vectors `v` (a kernel column, or a row of the half-done
/// transform), with `G`'s shared terms computed once.
#[inline(always)]
fn kernel_transform_3<const FMA: bool, const W: usize>(v: [[f32; W]; 3]) -> [[f32; W]; 6] {
    let mut t = [[0f32; W]; 6];
    for l in 0..W {
        let [g0, g1, g2] = [v[0][l], v[1][l], v[2][l]];
        let ends = g0 + g2;
        let outer = madd::<FMA>(g0, 1.0 / 24.0, g2 * (1.0 / 6.0));
        let middle = g1 * (1.0 / 12.0);
        t[0][l] = g0 * 0.25;
        t[1][l] = (ends + g1) * (-1.0 / 6.0);
        t[2][l] = (ends - g1) * (-1.0 / 6.0);
        t[3][l] = outer + middle;
        t[4][l] = outer - middle;
        t[5][l] = g2;
    }
    t
}

/// `G g Gᵀ` for `W` output channels at `k0` of input channel `ci` (see
/// [`winograd_kernel_rows`]): the nine taps in, the 36 positions out.
#[inline(always)]
fn kernel_block<const FMA: bool, const W: usize>(planes: &[f32], c: usize, o: usize, ci: usize, k0: usize, dst: &mut [f32]) {
    let tap = |t: usize| -> [f32; W] { planes[(t * c + ci) * o + k0..][..W].try_into().expect("block") };
    // Down each kernel column b: t[i][b] = Σₐ G[i][a] · g[a][b].
    let mut t = [[[0f32; W]; 3]; 6];
    for b in 0..3 {
        let column = kernel_transform_3::<FMA, W>([tap(b), tap(3 + b), tap(6 + b)]);
        for (row, v) in t.iter_mut().zip(column) {
            row[b] = v;
        }
    }
    // Then along each row of t.
    for i in 0..6 {
        let row = kernel_transform_3::<FMA, W>(t[i]);
        for (j, v) in row.iter().enumerate() {
            dst[(6 * i + j) * o + k0..][..W].copy_from_slice(v);
        }
    }
}

dispatch! {
    /// The Winograd F(4×4, 3×3) kernel transform `G g Gᵀ` for input channels `c0..` of a 3×3
    /// kernel held pixel-major (`planes [9·C, O]`: tap `3a + b` is the `[C, O]` plane `3a + b`),
    /// into `dst [rows, 36, O]` (input channel `c0 + r`, position, output channel): each
    /// kernel value is read once for all 36 positions.
    pub fn winograd_kernel_rows(dst: &mut [f32], planes: &[f32], c: usize, o: usize, c0: usize) {
        assert!(planes.len() >= 9 * c * o && dst.len().is_multiple_of(36 * o.max(1)) && c0 + dst.len() / (36 * o.max(1)) <= c);
        let full = o / WB * WB;
        for (r, d) in dst.chunks_exact_mut(36 * o.max(1)).enumerate() {
            for k0 in (0..full).step_by(WB) {
                kernel_block::<FMA, WB>(planes, c, o, c0 + r, k0, d);
            }
            for k0 in full..o {
                kernel_block::<FMA, 1>(planes, c, o, c0 + r, k0, d);
            }
        }
    }
}

/// Rows of the F(4×4, 3×3) output transform `Aᵀ` (4 × 6).
pub const WINOGRAD_AT: [[f32; 6]; 4] = [[1.0, 1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0, -2.0, 0.0], [0.0, 1.0, 1.0, 4.0, 4.0, 0.0], [0.0, 1.0, -1.0, 8.0, -8.0, 1.0]];

/// `Aᵀ M A` for `W` channels at `k0` of one tile (see [`winograd_output_tile`]).
#[inline(always)]
fn output_block<const FMA: bool, const W: usize>(m: &[f32], stride: usize, k0: usize, o: usize, out: &mut [f32]) {
    // Over the rows first: t[r][j] = Σᵢ Aᵀ[r][i] · M[i][j].
    let mut t = [[[0f32; W]; 6]; 4];
    for i in 0..6 {
        for j in 0..6 {
            let row: &[f32; W] = m[(6 * i + j) * stride + k0..][..W].try_into().expect("block");
            for r in 0..4 {
                let a = WINOGRAD_AT[r][i];
                if a != 0.0 {
                    for l in 0..W {
                        t[r][j][l] = madd::<FMA>(a, row[l], t[r][j][l]);
                    }
                }
            }
        }
    }
    // Then over the columns: Y[r][s] = Σⱼ Aᵀ[s][j] · t[r][j].
    for r in 0..4 {
        for s in 0..4 {
            let mut y = [0f32; W];
            for j in 0..6 {
                let a = WINOGRAD_AT[s][j];
                if a != 0.0 {
                    for l in 0..W {
                        y[l] = madd::<FMA>(a, t[r][j][l], y[l]);
                    }
                }
            }
            out[(4 * r + s) * o + k0..][..W].copy_from_slice(&y);
        }
    }
}

dispatch! {
    /// The Winograd F(4×4, 3×3) output transform `Aᵀ M A` of one tile: `m` holds the tile's 36
    /// product rows of `o` values, `stride` apart; `out` receives its 4×4 pixels (row-major),
    /// `o` values each.
    pub fn winograd_output_tile(m: &[f32], stride: usize, o: usize, out: &mut [f32]) {
        assert!(m.len() >= 35 * stride + o && out.len() >= 16 * o);
        let full = o / WB * WB;
        for k0 in (0..full).step_by(WB) {
            output_block::<FMA, WB>(m, stride, k0, o, out);
        }
        for k0 in full..o {
            output_block::<FMA, 1>(m, stride, k0, o, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_ref(x: f64) -> f64 {
        // Series, fine to |x| <= 3 in f64.
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            for fma in [false, true] {
                let got = if fma { exp::<true>(x) } else { exp::<false>(x) } as f64;
                let want = (x as f64).exp();
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "exp relative error {worst}");
        assert_eq!(exp::<false>(-1000.0), 0.0);
        assert_eq!(exp::<false>(f32::NEG_INFINITY), 0.0);
        assert!(exp::<false>(1000.0).is_finite());
    }

    #[test]
    fn gelu_is_accurate() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = 0.5 * x as f64 * (1.0 + erf_ref(x as f64 / 2f64.sqrt()));
            for got in [gelu_erf::<true>(x), gelu_erf::<false>(x)] {
                worst = worst.max((got as f64 - want).abs() / (1.0 + want.abs()));
            }
            x += 0.000_97;
        }
        assert!(worst < 3e-7, "gelu error {worst}");
    }
}
