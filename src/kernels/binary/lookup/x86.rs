//! The tables on x86 vector registers: AVX2's 8 columns of the input a vector, and AVX-512's 16.
//! The two differ only in the register and its intrinsics, so one macro writes both.
//!
//! Everything here runs only inside functions compiled with the path's feature (`avx2`,
//! `avx512f`) enabled and called where [`super::TablePath::Avx2`] or
//! [`super::TablePath::Avx512`] runs.

use super::{Columns, Lanes, Scaling, SignPlanes};
use std::arch::x86_64::*;
use std::ops::Range;

macro_rules! lanes {
    ($name:ident, $reg:ty, $n:literal, $feature:literal, $entry:ident,
     $zero:ident, $load:ident, $add:ident, $sub:ident, $store:ident) => {
        #[derive(Clone, Copy)]
        struct $name($reg);

        impl Lanes for $name {
            const N: usize = $n;

            #[inline(always)]
            fn zero() -> Self {
                // SAFETY: see the module doc.
                $name(unsafe { $zero() })
            }

            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                // SAFETY: the caller's contract, and see the module doc.
                $name(unsafe { $load(p) })
            }

            #[inline(always)]
            fn add(self, o: Self) -> Self {
                // SAFETY: see the module doc.
                $name(unsafe { $add(self.0, o.0) })
            }

            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                // SAFETY: see the module doc.
                $name(unsafe { $sub(self.0, o.0) })
            }

            #[inline(always)]
            fn to_array(self) -> [f32; 16] {
                let mut a = [0.0; 16];
                // SAFETY: see the module doc; `a` holds 16 floats, at least `N`.
                unsafe { $store(a.as_mut_ptr(), self.0) };
                a
            }
        }

        /// [`super::signed_sums`] on this path.
        ///
        /// # Safety
        /// The CPU has the path's feature, and the sizes were checked by the caller.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn $entry(
            w: &SignPlanes,
            outs: Range<usize>,
            x: &Columns,
            scaling: &Scaling,
            y: &mut [f32],
            y_stride: usize,
        ) {
            super::sums::<$name>(w, outs, x, scaling, y, y_stride)
        }
    };
}

lanes!(
    Ymm,
    __m256,
    8,
    "avx2",
    avx2,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_add_ps,
    _mm256_sub_ps,
    _mm256_storeu_ps
);
lanes!(
    Zmm,
    __m512,
    16,
    "avx512f",
    avx512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_add_ps,
    _mm512_sub_ps,
    _mm512_storeu_ps
);
