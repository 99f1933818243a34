//! Row kernels: the softmax of one row of scores, and the scores of one query row against key
//! rows read in place (the path for few query rows, where packing Kᵀ would cost a pass over K).

use super::simd::Simd;

/// Softmax of `row` in place: max, then `e^(x - max)` and its sum, then `× (1 / sum)`.
///
/// The last step multiplies by the rounded reciprocal where Keras divides: at most one more ulp
/// per weight, for one division per row instead of one per weight. NaN anywhere makes the whole
/// row NaN, as in NumPy.
#[inline(always)]
pub(crate) unsafe fn softmax_row<S: Simd>(row: &mut [f32]) {
    let l = S::LANES;
    let (body, tail) = row.split_at_mut(row.len() - row.len() % l);
    // The tail is processed as a full vector padded with -inf (e^-inf = 0 adds nothing).
    let mut pad = [f32::NEG_INFINITY; 16];
    pad[..tail.len()].copy_from_slice(tail);
    let mut mx = S::splat(f32::NEG_INFINITY);
    for c in body.chunks_exact(l) {
        mx = S::max(mx, S::load(c.as_ptr()));
    }
    mx = S::max(mx, S::load(pad.as_ptr()));
    let max = S::splat(S::hmax(mx));
    let mut sum = S::zero();
    for c in body.chunks_exact_mut(l) {
        let e = S::exp(S::sub(S::load(c.as_ptr()), max));
        S::store(c.as_mut_ptr(), e);
        sum = S::add(sum, e);
    }
    let e = S::exp(S::sub(S::load(pad.as_ptr()), max));
    S::store(pad.as_mut_ptr(), e);
    sum = S::add(sum, e);
    let inv = S::splat(1.0 / S::sum(sum));
    for c in body.chunks_exact_mut(l) {
        S::store(c.as_mut_ptr(), S::mul(S::load(c.as_ptr()), inv));
    }
    S::store(pad.as_mut_ptr(), S::mul(S::load(pad.as_ptr()), inv));
    tail.copy_from_slice(&pad[..tail.len()]);
}

/// `out[j] = (query · key_j) × scale` for key rows `key_j` (each `query.len()` contiguous floats,
/// row j at `key + j·ld`). Lane partial sums, then a fixed-order
/// horizontal sum.
#[inline(always)]
pub(crate) unsafe fn dot_rows<S: Simd>(
    query: &[f32],
    key: *const f32,
    ld: usize,
    out: &mut [f32],
    scale: Option<f32>,
) {
    let (l, d) = (S::LANES, query.len());
    let full = d - d % l;
    let m = S::mask(d - full);
    for (j, o) in out.iter_mut().enumerate() {
        let k = key.add(j * ld);
        let mut acc = S::zero();
        let mut x = 0;
        while x < full {
            acc = S::fma(S::load(query.as_ptr().add(x)), S::load(k.add(x)), acc);
            x += l;
        }
        if full < d {
            acc = S::fma(
                S::load_masked(query.as_ptr().add(full), m),
                S::load_masked(k.add(full), m),
                acc,
            );
        }
        let s = S::sum(acc);
        *o = scale.map_or(s, |c| s * c);
    }
}
