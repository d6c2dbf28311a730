//! Element-wise math on `f32` slices for the fused CPU kernels.
//!
//! libm's `expf` and `erff` are scalar calls and were about a sixth of all CPU time (softmax,
//! SiLU, GELU). The versions here are branch-free so that LLVM vectorises the loops that call
//! them, and every public function has three builds of its loop: plain (the baseline target,
//! no FMA), AVX2 + FMA, and AVX-512 (with AVX2 and FMA). [`build`] says which one runs: the
//! widest the CPU has, or the one `LORAGATE_KERNELS=plain|avx2|avx512` forces (refused when the
//! CPU lacks it), so that the tests can run every build the machine has.
//! Accuracy: `exp` is within about 2 ulp; the GELU's erf is within 1.5e-7 (absolute).

use std::sync::atomic::{AtomicU8, Ordering};

/// A build of the kernels: the same loops compiled for another instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Build {
    /// The baseline target (SSE2 on x86-64), no fused multiply-add: what CPUs without AVX2
    /// and other architectures run.
    Plain,
    /// AVX2 + FMA, 256-bit vectors.
    Avx2,
    /// AVX-512F (+ AVX2 + FMA, which the attention tiles' intrinsics use): 512-bit vectors.
    Avx512,
}

/// The CPU features the builds need, as detected (or as a test describes a CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    pub avx512f: bool,
    pub avx2: bool,
    pub fma: bool,
}

impl CpuFeatures {
    /// This CPU's features (all false off x86-64).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        CpuFeatures::default()
    }
}

impl Build {
    /// Every build, plainest first.
    pub const ALL: [Build; 3] = [Build::Plain, Build::Avx2, Build::Avx512];

    /// The name `LORAGATE_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Build::Plain => "plain",
            Build::Avx2 => "avx2",
            Build::Avx512 => "avx512",
        }
    }

    /// The features the build is compiled for, each of which the CPU must have: the
    /// `#[target_feature]` lists in `dispatch!`.
    pub fn needs(self) -> &'static [&'static str] {
        match self {
            Build::Plain => &[],
            Build::Avx2 => &["avx2", "fma"],
            Build::Avx512 => &["avx512f", "avx2", "fma"],
        }
    }

    /// The features of [`Build::needs`] that `cpu` lacks (empty: the build runs on it).
    pub fn missing_on(self, cpu: &CpuFeatures) -> Vec<&'static str> {
        let has = |f: &str| match f {
            "avx512f" => cpu.avx512f,
            "avx2" => cpu.avx2,
            "fma" => cpu.fma,
            _ => false,
        };
        // Only x86-64 has the wide builds at all.
        let arch_ok = cfg!(target_arch = "x86_64") || self == Build::Plain;
        self.needs().iter().copied().filter(|f| !arch_ok || !has(f)).collect()
    }

    /// The builds `cpu` runs, plainest first.
    pub fn supported_on(cpu: &CpuFeatures) -> Vec<Build> {
        Build::ALL.into_iter().filter(|b| b.missing_on(cpu).is_empty()).collect()
    }

    /// The build a process takes on `cpu`: `requested` (a `LORAGATE_KERNELS` value) when
    /// given and the CPU has it, else the widest the CPU has. An unknown name, or a build the
    /// CPU lacks, is refused with what is missing (never quietly replaced by another build).
    pub fn choose(requested: Option<&str>, cpu: &CpuFeatures) -> Result<Build, String> {
        let Some(name) = requested.map(str::trim).filter(|n| !n.is_empty()) else {
            return Ok(*Build::supported_on(cpu).last().expect("the plain build runs everywhere"));
        };
        let Some(build) = Build::ALL.into_iter().find(|b| b.name().eq_ignore_ascii_case(name)) else {
            return Err(format!("LORAGATE_KERNELS={name}: unknown kernel build (use plain, avx2 or avx512)"));
        };
        let missing = build.missing_on(cpu);
        if !missing.is_empty() {
            return Err(format!("LORAGATE_KERNELS={name}: this CPU lacks {} (it runs: {})", missing.join(", "), Build::supported_on(cpu).iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")));
        }
        Ok(build)
    }
}

/// The builds this CPU runs, plainest first.
pub fn supported_builds() -> Vec<Build> {
    Build::supported_on(&CpuFeatures::detect())
}

/// 0: not decided yet; else 1 + the index in [`Build::ALL`] of the build every kernel runs.
/// Written only with what [`Build::choose`] returned for this CPU, so a wide build is only ever
/// stored on a CPU that has all its features (what `dispatch!` relies on).
static BUILD: AtomicU8 = AtomicU8::new(0);

/// The kernel build this process runs (decided on first use, see [`init_from_env`]).
///
/// Panics when `LORAGATE_KERNELS` names a build this CPU lacks (or no build) and
/// [`init_from_env`] did not refuse it first: the binary calls that at start and exits 2, so
/// only a library user or a test binary reaches the panic, rather than a run on a build
/// nobody asked for.
pub fn build() -> Build {
    match BUILD.load(Ordering::Relaxed) {
        0 => match choose_from_env() {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        },
        i => Build::ALL[i as usize - 1],
    }
}

fn choose_from_env() -> Result<Build, String> {
    let requested = std::env::var("LORAGATE_KERNELS").ok();
    let b = Build::choose(requested.as_deref(), &CpuFeatures::detect())?;
    BUILD.store(Build::ALL.iter().position(|x| *x == b).expect("listed") as u8 + 1, Ordering::Relaxed);
    Ok(b)
}

/// Decides the kernel build from `LORAGATE_KERNELS` and the CPU, refusing a build the CPU
/// lacks or an unknown name with the reason (the binary calls it first and exits 2).
pub fn init_from_env() -> crate::error::Result<Build> {
    choose_from_env().map_err(crate::error::Error::invalid)
}

/// Defines `pub fn $name(args)` that runs `$body` compiled for the chosen [`build`]: AVX-512 or
/// AVX2+FMA, else the baseline target. Inside `$body`, `FMA` is a const bool: use [`madd`] with it.
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
                match build() {
                    // SAFETY: `build()` is `Avx512` only on a CPU with avx512f, avx2 and fma,
                    // the features `wide` is compiled for (`Build::choose`, `Build::needs`).
                    Build::Avx512 => return unsafe { wide($($a),*) },
                    // SAFETY: likewise `Avx2` only with avx2 and fma, `fast`'s features.
                    Build::Avx2 => return unsafe { fast($($a),*) },
                    Build::Plain => {}
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

/// The AVX2 + FMA intrinsics of the attention tiles, behind a token that proves the CPU has
/// those instructions: [`Avx2Fma::in_build`] is its only constructor (the field is private to
/// this module), and it makes one only when the dispatch chose a wide build, which
/// [`Build::choose`] does only on CPUs with AVX2 and FMA. So no code path, whatever it passes
/// as `FMA`, can reach the intrinsics on a CPU without them.
mod avx2 {
    use super::{Build, KB, QB, build};

    #[derive(Clone, Copy)]
    pub struct Avx2Fma(());

    impl Avx2Fma {
        /// `Some` in the AVX2 and AVX-512 builds (`FMA` set, `build()` wide), `None` in the
        /// plain build (whose tiles are the portable loops).
        #[inline(always)]
        pub fn in_build<const FMA: bool>() -> Option<Self> {
            (FMA && cfg!(target_arch = "x86_64") && build() != Build::Plain).then_some(Avx2Fma(()))
        }

        /// See [`super::scores_tile`].
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        pub fn scores_tile(self, qb: &[f32], d: usize, kt: &[f32], mp: usize, j0: usize) -> [[f32; KB]; QB] {
            use std::arch::x86_64::*;
            assert!(d == 0 || (kt.len() >= (d - 1) * mp + j0 + KB && qb.len() >= QB * d));
            // SAFETY: `self` exists only on a CPU with AVX2 and FMA (see `in_build`); the
            // assert bounds every read.
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
                out
            }
        }

        /// See [`super::values_tile`].
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        pub fn values_tile(self, p: &[f32], mp: usize, m: usize, v: &[f32], dp: usize, c0: usize) -> [[f32; KB]; QB] {
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
                out
            }
        }
    }
}

use avx2::Avx2Fma;

/// `QB` query rows `qb [QB, d]` times keys `j0..j0+KB` of `kt [d, mp]`: AVX2 intrinsics with a
/// [`Avx2Fma`] token, else portable loops.
#[inline(always)]
fn scores_tile<const FMA: bool>(simd: Option<Avx2Fma>, qb: &[f32], d: usize, kt: &[f32], mp: usize, j0: usize) -> [[f32; KB]; QB] {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = simd {
        return simd.scores_tile(qb, d, kt, mp, j0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
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
/// `v [m, dp]` (see [`scores_tile`]).
#[inline(always)]
fn values_tile<const FMA: bool>(simd: Option<Avx2Fma>, p: &[f32], mp: usize, m: usize, v: &[f32], dp: usize, c0: usize) -> [[f32; KB]; QB] {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = simd {
        return simd.values_tile(p, mp, m, v, dp, c0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
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
        let simd = Avx2Fma::in_build::<FMA>();
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
                let acc = scores_tile::<FMA>(simd, qb, d, kv.kt, mp, j0);
                for r in 0..QB {
                    s[r * mp + j0..][..KB].copy_from_slice(&acc[r]);
                }
            }
            for r in 0..nq {
                softmax_row::<FMA>(&mut s[r * mp..r * mp + m], 1.0);
            }
            // Probabilities times values: a QB × KB tile of the output per step over keys.
            for c0 in (0..dp).step_by(KB) {
                let acc = values_tile::<FMA>(simd, s, mp, m, kv.v, dp, c0);
                let width = KB.min(d - c0);
                for r in 0..nq {
                    o[(i0 + r) * o_stride + c0..][..width].copy_from_slice(&acc[r][..width]);
                }
            }
        }
    }
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

/// For the test suites: runs the tests matching `filter` in this test binary again, once under
/// each build this CPU runs other than the one this process took, with `LORAGATE_KERNELS`
/// forcing it (the tests named in `skip` are left out: the calling test, so children do not
/// recurse, and any the caller runs once only). Each child
/// must pass, and must say that its forced build was in effect: the test named
/// `the_forced_kernel_build_is_in_effect` under `filter` prints `kernel build in effect: NAME`
/// and fails when the switch did not take. Returns every build that ran the tests (this
/// process's included), with each child's count of passed tests; panics on any failure.
#[doc(hidden)]
pub fn rerun_tests_under_other_builds(filter: &str, skip: &[&str]) -> Vec<(Build, usize)> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut ran = vec![(build(), 0)];
    for b in supported_builds().into_iter().filter(|&b| b != build()) {
        let t = std::time::Instant::now();
        let out = std::process::Command::new(&exe)
            .arg(filter)
            .args(skip.iter().flat_map(|s| ["--skip", s]))
            .arg("--show-output")
            .env("LORAGATE_KERNELS", b.name())
            .output()
            .expect("the test binary runs again");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "the tests under LORAGATE_KERNELS={} failed:\n{text}", b.name());
        assert!(
            text.contains(&format!("kernel build in effect: {}", b.name())),
            "LORAGATE_KERNELS={} ran, but no test reported that build in effect (is `the_forced_kernel_build_is_in_effect` under {filter}?):\n{text}",
            b.name()
        );
        let passed = text
            .lines()
            .find_map(|l| l.strip_prefix("test result: ok. ")?.split(' ').next()?.parse::<usize>().ok())
            .expect("a libtest summary line");
        eprintln!("LORAGATE_KERNELS={}: {passed} tests passed in {:.1} s", b.name(), t.elapsed().as_secs_f64());
        ran.push((b, passed));
    }
    ran.sort();
    ran
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

    /// Run by [`rerun_tests_under_other_builds`]' children (and here): the build that
    /// `LORAGATE_KERNELS` asks for is the one every kernel runs, and only a wide build hands
    /// out the token for the attention tiles' intrinsics.
    #[test]
    fn the_forced_kernel_build_is_in_effect() {
        let want = Build::choose(std::env::var("LORAGATE_KERNELS").ok().as_deref(), &CpuFeatures::detect()).unwrap();
        assert_eq!(build(), want);
        assert_eq!(Avx2Fma::in_build::<true>().is_some(), want != Build::Plain);
        assert!(Avx2Fma::in_build::<false>().is_none());
        println!("kernel build in effect: {}", build().name());
    }

    /// The kernel tests (everything under `model::ops`) under every build this CPU runs: this
    /// process runs them under its own, children under the others (see
    /// [`rerun_tests_under_other_builds`]).
    #[test]
    fn every_kernel_build_this_cpu_runs_passes_the_kernel_tests() {
        let ran = rerun_tests_under_other_builds("model::ops::", &["every_kernel_build_this_cpu_runs_passes_the_kernel_tests"]);
        let builds: Vec<Build> = ran.iter().map(|(b, _)| *b).collect();
        assert_eq!(builds, supported_builds(), "every build this CPU runs, each once");
        // Each child ran the whole module, not a stray filter's handful.
        for (b, passed) in &ran[..] {
            assert!(*b == build() || *passed >= 30, "{}: only {passed} kernel tests ran", b.name());
        }
        let names: Vec<&str> = builds.iter().map(|b| b.name()).collect();
        eprintln!("kernel tests ran under: {}", names.join(", "));
    }

    #[test]
    fn a_build_needs_every_feature_it_is_compiled_for() {
        let cpu = |avx512f, avx2, fma| CpuFeatures { avx512f, avx2, fma };
        let all = cpu(true, true, true);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(Build::choose(None, &all), Ok(Build::Avx512));
            assert_eq!(Build::choose(None, &cpu(false, true, true)), Ok(Build::Avx2));
            // AVX-512F without AVX2 (or without FMA) runs neither wide build: `wide` is
            // compiled for all three, and the attention tiles' intrinsics are AVX2 + FMA.
            assert_eq!(Build::choose(None, &cpu(true, false, true)), Ok(Build::Plain));
            assert_eq!(Build::choose(None, &cpu(true, true, false)), Ok(Build::Plain));
            let e = Build::choose(Some("avx512"), &cpu(true, false, true)).unwrap_err();
            assert!(e.contains("lacks avx2") && e.contains("runs: plain"), "{e}");
            assert_eq!(Build::choose(Some("avx2"), &all), Ok(Build::Avx2));
            assert_eq!(Build::choose(Some("AVX512"), &all), Ok(Build::Avx512));
            assert_eq!(Build::supported_on(&all), Build::ALL.to_vec());
        }
        assert_eq!(Build::choose(Some("plain"), &CpuFeatures::default()), Ok(Build::Plain));
        let e = Build::choose(Some("avx2"), &CpuFeatures::default()).unwrap_err();
        assert!(e.contains("LORAGATE_KERNELS=avx2") && e.contains("lacks avx2, fma"), "{e}");
        let e = Build::choose(Some("sse4"), &all).unwrap_err();
        assert!(e.contains("unknown kernel build"), "{e}");
        assert_eq!(Build::choose(Some(""), &CpuFeatures::default()), Ok(Build::Plain));
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
