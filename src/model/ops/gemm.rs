//! Strided matrix products straight into a caller's buffer, through the `gemm` crate (candle's
//! own CPU matrix-product engine). The fused kernels use it where candle's `matmul` would need
//! a tensor per operand and a copy per transposed or interleaved view (attention heads read in
//! place from `[B, N, H·d]`). The wrapper checks every view against its slice, so callers stay
//! safe code.

/// A read-only `rows × cols` view of `data`: element `(r, c)` at `r·row_stride + c·col_stride`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl MatRef<'_> {
    /// Whether every element of the view lies inside `data`. The offset of the last element is
    /// computed with checked arithmetic: a view whose offsets overflow `usize` (which wrapping
    /// in a release build would turn into a small offset that passes) does not fit.
    fn fits(&self, len: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1).checked_mul(self.row_stride).and_then(|r| (self.cols - 1).checked_mul(self.col_stride).and_then(|c| r.checked_add(c)));
        last.is_some_and(|last| last < len)
    }

    /// Whether gemm can take the strides (it reads them as `isize`).
    fn strides_fit_isize(&self) -> bool {
        isize::try_from(self.row_stride).is_ok() && isize::try_from(self.col_stride).is_ok()
    }
}

/// `dst = lhs · rhs` on one thread (callers parallelise over many products), `dst` being
/// `lhs.rows × rhs.cols` with rows `dst_row_stride` apart and contiguous columns.
///
/// Panics when the shapes disagree, a view reaches outside its slice, or the destination's
/// rows overlap (`dst_row_stride < rhs.cols` with more than one row): gemm's threads write
/// disjoint blocks of rows and columns, and overlapping rows would make two of them write the
/// same element at once. All are bugs in the caller; the checks keep them panics, never
/// undefined behaviour, so callers stay safe code.
pub fn matmul_into(dst: &mut [f32], dst_row_stride: usize, lhs: MatRef<'_>, rhs: MatRef<'_>) {
    product(dst, dst_row_stride, lhs, rhs, false, ::gemm::Parallelism::None)
}

/// [`matmul_into`] for one large product, split over rayon's threads.
pub fn matmul_into_parallel(dst: &mut [f32], dst_row_stride: usize, lhs: MatRef<'_>, rhs: MatRef<'_>) {
    product(dst, dst_row_stride, lhs, rhs, false, parallel())
}

/// `dst += lhs · rhs` on one thread (see [`matmul_into`]).
pub fn matmul_add_into(dst: &mut [f32], dst_row_stride: usize, lhs: MatRef<'_>, rhs: MatRef<'_>) {
    product(dst, dst_row_stride, lhs, rhs, true, ::gemm::Parallelism::None)
}

/// `dst += lhs · rhs`, split over rayon's threads: what `dst` already holds (a bias, a residual)
/// is added in the product's own pass over it.
pub fn matmul_add_into_parallel(dst: &mut [f32], dst_row_stride: usize, lhs: MatRef<'_>, rhs: MatRef<'_>) {
    product(dst, dst_row_stride, lhs, rhs, true, parallel())
}

fn parallel() -> ::gemm::Parallelism {
    ::gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
}

fn product(dst: &mut [f32], dst_row_stride: usize, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, parallelism: ::gemm::Parallelism) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul_into: inner dimensions differ");
    assert!(lhs.fits(lhs.data.len()) && rhs.fits(rhs.data.len()), "matmul_into: operand view outside its data");
    let out = MatRef { data: dst, rows: m, cols: n, row_stride: dst_row_stride, col_stride: 1 };
    assert!(out.fits(dst.len()), "matmul_into: destination view outside its data");
    assert!(m <= 1 || dst_row_stride >= n, "matmul_into: destination rows overlap ({m} rows of {n} values, {dst_row_stride} apart)");
    assert!(lhs.strides_fit_isize() && rhs.strides_fit_isize() && out.strides_fit_isize(), "matmul_into: a stride beyond isize::MAX");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if accumulate {
            return;
        }
        for r in 0..m {
            dst[r * dst_row_stride..][..n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm reads or writes inside its slice (with
    // offsets that cannot overflow, and strides that convert to isize unchanged), the
    // destination's rows are disjoint (each element has one writer among gemm's threads), and
    // `dst` is borrowed mutably, so no operand aliases it.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_the_definition() {
        // lhs 3×4 read transposed from a 4×3 buffer; rhs 4×2 with a row stride of 5.
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..20).map(|i| (i as f32).sin()).collect();
        let lhs = MatRef { data: &a, rows: 3, cols: 4, row_stride: 1, col_stride: 3 };
        let rhs = MatRef { data: &b, rows: 4, cols: 2, row_stride: 5, col_stride: 1 };
        let mut dst = vec![7f32; 3 * 6];
        matmul_into(&mut dst, 6, lhs, rhs);
        let mut parallel = vec![7f32; 3 * 6];
        matmul_into_parallel(&mut parallel, 6, lhs, rhs);
        assert_eq!(dst, parallel);
        // Accumulating adds the product to what the destination holds.
        let mut acc = vec![1f32; 3 * 6];
        matmul_add_into_parallel(&mut acc, 6, lhs, rhs);
        for r in 0..3 {
            for c in 0..2 {
                let want: f32 = (0..4).map(|t| a[r + 3 * t] * b[t * 5 + c]).sum();
                assert!((dst[r * 6 + c] - want).abs() < 1e-5, "({r}, {c})");
                assert!((acc[r * 6 + c] - want - 1.0).abs() < 1e-5, "accumulated ({r}, {c})");
            }
            // Columns outside the product are left alone.
            assert_eq!(dst[r * 6 + 2], 7.0);
        }
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_view_past_its_data_is_refused() {
        let a = vec![0f32; 5];
        let lhs = MatRef { data: &a, rows: 2, cols: 3, row_stride: 3, col_stride: 1 };
        let rhs = MatRef { data: &a, rows: 3, cols: 1, row_stride: 1, col_stride: 1 };
        matmul_into(&mut [0f32; 2], 1, lhs, rhs);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_view_whose_offsets_overflow_is_refused() {
        // (rows - 1) · row_stride wraps to 0 in a release build's unchecked arithmetic: a view
        // of 2^63 · 2 elements would then pass as fitting in one.
        let a = vec![0f32; 4];
        let lhs = MatRef { data: &a, rows: 3, cols: 1, row_stride: 1 << (usize::BITS - 1), col_stride: 1 };
        let rhs = MatRef { data: &a, rows: 1, cols: 1, row_stride: 1, col_stride: 1 };
        matmul_into(&mut [0f32; 3], 1, lhs, rhs);
    }

    #[test]
    fn overlapping_destination_rows_are_refused_and_one_row_needs_no_stride() {
        let a = vec![1f32; 8];
        let lhs = MatRef { data: &a, rows: 2, cols: 2, row_stride: 2, col_stride: 1 };
        let rhs = MatRef { data: &a, rows: 2, cols: 4, row_stride: 4, col_stride: 1 };
        // Two rows of 4 values 2 apart share two elements: refused on both paths.
        for parallel in [false, true] {
            let mut dst = vec![0f32; 8];
            let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if parallel { matmul_into_parallel(&mut dst, 2, lhs, rhs) } else { matmul_add_into(&mut dst, 2, lhs, rhs) }
            }));
            let message = refused.expect_err("overlapping rows must be refused");
            let message = message.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(message.contains("destination rows overlap"), "{message}");
        }
        // Rows exactly n apart, and a single row with any stride, are fine.
        let mut dst = vec![0f32; 8];
        matmul_into_parallel(&mut dst, 4, lhs, rhs);
        assert_eq!(dst, vec![2f32; 8]);
        let one = MatRef { data: &a, rows: 1, cols: 2, row_stride: 2, col_stride: 1 };
        let mut row = vec![0f32; 4];
        matmul_into(&mut row, 0, one, rhs);
        assert_eq!(row, vec![2f32; 4]);
    }
}
