//! Vector work a tile product runs between its groups of tile products ([`SideWork`]):
//! prefetches ([`Prefetch`]) and the next item's query split ([`SplitAhead`]), paced by [`Spread`].

use std::arch::x86_64::*;

use super::buf::{mut_ptrs, QueryRows, Scratch};
use super::split::{split_queries, split_row};

/// Vector work a tile product runs between its groups of tile products: the tile unit takes 16
/// cycles per product and the core goes on issuing meanwhile, so small steps of vector work are
/// mostly hidden. Vector work beyond about 16 operations per tile product, or a whole row's pass
/// at once, is not: the vector units get one port while tiles compute (measured:
/// docs/performance.md, "Where the thresholds come from").
pub(crate) trait SideWork {
    /// Steps of work left.
    fn units(&self) -> usize;
    /// Does one step (nothing when none is left).
    ///
    /// # Safety
    /// As the implementation documents; runs inside code compiled for AVX-512F.
    unsafe fn step(&mut self);
}

/// No side work.
pub(crate) struct NoWork;

impl SideWork for NoWork {
    fn units(&self) -> usize {
        0
    }
    #[inline(always)]
    unsafe fn step(&mut self) {}
}

/// Side work that asks for memory to be brought into L2 ([`_MM_HINT_T1`] prefetches), 4 cache
/// lines per step: `rows` runs of `row_bytes`, `stride` bytes apart. A prefetch never faults,
/// whatever the memory holds. For the rows of returned weights an item is about to write,
/// during its scores: their stores then find the lines in L2 instead of fetching each for
/// ownership from L3 in the middle of the softmax, which costs more than the fills take from the
/// scores' tile products (measured: docs/performance.md, "Where the thresholds come from"). And
/// for the next item's query rows ([`SplitAhead`]).
pub(crate) struct Prefetch {
    next: *const i8,
    end: *const i8,
    row: *const i8,
    rows_left: usize,
    row_bytes: usize,
    stride: usize,
}

impl Prefetch {
    /// Cache lines per step.
    const LINES: usize = 4;

    /// The `bytes` at `p` (any alignment).
    pub(crate) fn new(p: *const i8, bytes: usize) -> Prefetch {
        Prefetch::rows(p, 1, bytes, bytes)
    }

    /// `rows` runs of `row_bytes` from `p`, `stride` bytes apart (one run when they touch).
    pub(crate) fn rows(p: *const i8, rows: usize, row_bytes: usize, stride: usize) -> Prefetch {
        let (rows, row_bytes) = match stride == row_bytes {
            true => (rows.min(1), rows * row_bytes),
            false => (rows, row_bytes),
        };
        Prefetch {
            next: p.wrapping_sub(p as usize % 64),
            end: p.wrapping_add(if rows == 0 { 0 } else { row_bytes }),
            row: p,
            rows_left: rows.saturating_sub(1),
            row_bytes,
            stride,
        }
    }

    /// Whether every line was asked for.
    fn done(&self) -> bool {
        self.next >= self.end && self.rows_left == 0
    }
}

impl SideWork for Prefetch {
    fn units(&self) -> usize {
        let first = (self.end as usize).saturating_sub(self.next as usize);
        let lines = first.div_ceil(64) + self.rows_left * (self.row_bytes.div_ceil(64) + 1);
        lines.div_ceil(Self::LINES)
    }

    #[inline(always)]
    unsafe fn step(&mut self) {
        // SAFETY: the `SideWork::step` contract (AVX-512F code) and this type's own, set when it
        // was made.
        unsafe {
            for _ in 0..Self::LINES {
                if self.next >= self.end {
                    if self.rows_left == 0 {
                        return;
                    }
                    self.rows_left -= 1;
                    self.row = self.row.wrapping_add(self.stride);
                    self.next = self.row.wrapping_sub(self.row as usize % 64);
                    self.end = self.row.wrapping_add(self.row_bytes);
                }
                _mm_prefetch::<_MM_HINT_T1>(self.next);
                self.next = self.next.wrapping_add(64);
            }
        }
    }
}

/// Spreads a side work's steps evenly over a product's `groups` groups of tile products
/// (Bresenham: `units / groups` steps per group, the remainder spread).
pub(super) struct Spread {
    units: usize,
    groups: usize,
    credit: usize,
}

impl Spread {
    pub(super) fn new<S: SideWork>(side: &S, groups: usize) -> Spread {
        Spread {
            units: side.units(),
            groups: groups.max(1),
            credit: 0,
        }
    }
    /// After one group: its share of the steps.
    #[inline(always)]
    pub(super) unsafe fn group<S: SideWork>(&mut self, side: &mut S) {
        // SAFETY: the `SideWork::step` contract (AVX-512F code) and this type's own, set when it
        // was made.
        unsafe {
            if self.units == 0 {
                return;
            }
            self.credit += self.units;
            while self.credit >= self.groups {
                self.credit -= self.groups;
                side.step();
            }
        }
    }
}

/// [`split_queries`] for `at`, unless a [`SplitAhead`] already split these rows in this call.
///
/// # Safety
/// As [`split_queries`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn queries_for(s: &mut Scratch, at: QueryRows) -> Option<usize> {
    // SAFETY: within this function's `# Safety` contract, which the caller upholds.
    unsafe {
        let dp = at.d.next_multiple_of(32);
        match s.ahead.take() {
            Some((held, exact)) if held == at => exact.then_some(dp),
            _ => split_queries(s, at.q0, at.ld, at.rows, at.d),
        }
    }
}

/// Side work that splits the next item's query rows into the query parts, once the item's own
/// scores no longer need them: first its steps prefetch the rows ([`Prefetch`]), then each
/// step splits one row ([`split_row`]); [`SplitAhead::finish`] records what the parts hold, for
/// [`queries_for`]. Without a next item it does nothing.
pub(crate) struct SplitAhead {
    at: Option<QueryRows>,
    rows_ahead: Prefetch,
    dst: [*mut u16; 3],
    dp: usize,
    r: usize,
    exact: bool,
}

impl SplitAhead {
    /// Sizes the query parts for `at` (the item's own scores are done with them), to run
    /// between the `groups` groups of tile products of a product: only if it has at most a
    /// step per group (a row's split, ~50 vector operations, is about what a group's four tile
    /// products hide). Denser, it slowed (32, 128, 128, 64) calls by 4%, where its combines have
    /// 48-96 groups for 128 steps.
    pub(crate) fn new(s: &mut Scratch, at: Option<QueryRows>, groups: usize) -> SplitAhead {
        s.ahead = None;
        let rows_ahead = |a: QueryRows| Prefetch::rows(a.q0.cast(), a.rows, a.d * 4, a.ld * 4);
        let mut ahead = SplitAhead {
            at,
            rows_ahead: Prefetch::new(std::ptr::null(), 0),
            dst: [std::ptr::null_mut(); 3],
            dp: 0,
            r: 0,
            exact: true,
        };
        if let Some(a) = at {
            ahead.rows_ahead = rows_ahead(a);
            ahead.dp = a.d.next_multiple_of(32);
        }
        // The filter counts the steps the product will run (`SideWork::units`).
        if ahead.units() > groups {
            ahead.at = None;
            return ahead;
        }
        for b in &mut s.q {
            b.reserve(ahead.at.map_or(0, |a| a.rows.next_multiple_of(32)) * ahead.dp);
        }
        ahead.dst = mut_ptrs(&mut s.q);
        ahead
    }

    /// Splits row `r`.
    ///
    /// # Safety
    /// AVX-512F; `at`'s rows are readable (the caller's contract for the next item's queries).
    #[inline(always)]
    unsafe fn split(&mut self, at: QueryRows) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let r = self.r;
            let dst = self.dst.map(|p| p.add(r * self.dp));
            self.exact &= split_row(at.q0.add(r * at.ld), at.d, self.dp, dst, 32);
            self.r += 1;
        }
    }

    /// Splits what is left and records the rows in `s`.
    ///
    /// # Safety
    /// As [`SplitAhead::split`].
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn finish(mut self, s: &mut Scratch) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            if let Some(at) = self.at {
                while self.r < at.rows {
                    self.split(at);
                }
                s.ahead = Some((at, self.exact));
            }
        }
    }
}

impl SideWork for SplitAhead {
    fn units(&self) -> usize {
        self.at.map_or(0, |a| self.rows_ahead.units() + a.rows)
    }

    #[inline(always)]
    unsafe fn step(&mut self) {
        // SAFETY: the `SideWork::step` contract (AVX-512F code) and this type's own, set when it
        // was made.
        unsafe {
            let Some(at) = self.at else {
                return;
            };
            if !self.rows_ahead.done() {
                self.rows_ahead.step();
            } else if self.r < at.rows {
                self.split(at);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::buf::ptrs;
    use super::super::split::tests::Floats;
    use super::*;

    pub(crate) fn bf16_at(p: *const u16, i: usize) -> f64 {
        // SAFETY: callers index inside the buffers they sized.
        f32::from_bits((unsafe { *p.add(i) } as u32) << 16) as f64
    }

    /// The query rows the parts hold, rebuilt from them (`rows × d`, rows `dp` apart; within a
    /// chunk of 32, element j at position 2j and element 16 + j at 2j + 1).
    fn held_queries(s: &Scratch, rows: usize, d: usize, dp: usize) -> Vec<f64> {
        let parts = ptrs(&s.q);
        let at = |r: usize, k: usize| r * dp + k / 32 * 32 + (k % 32 % 16) * 2 + k % 32 / 16;
        let sum = |i: usize| parts.iter().map(|&p| bf16_at(p, i)).sum::<f64>();
        (0..rows * d).map(|x| sum(at(x / d, x % d))).collect()
    }

    /// A split ahead serves only the rows and the call it was made for, and only when its
    /// product had room for it.
    #[test]
    fn queries_split_ahead_serve_only_their_call() {
        if !is_x86_feature_detected!("avx512f") {
            return; // no AVX-512F: nothing here runs on this CPU
        }
        let (rows, d, ld) = (37usize, 40usize, 43usize);
        let mut rng = Floats(11);
        let mut q: Vec<f32> = (0..rows * ld).map(|_| rng.uniform(2.0)).collect();
        let wanted = |q: &[f32]| -> Vec<f64> {
            (0..rows * d)
                .map(|x| q[x / d * ld + x % d] as f64)
                .collect()
        };
        let first = wanted(&q);
        let at = |call: u64, q: &[f32]| QueryRows {
            call,
            q0: q.as_ptr(),
            ld,
            rows,
            d,
        };
        let mut s = Scratch::default();
        // SAFETY: AVX-512F was detected; the rows are readable for `d` floats each.
        unsafe {
            let change = |q: &mut Vec<f32>| q.iter_mut().for_each(|x| *x = -*x * 0.75);
            SplitAhead::new(&mut s, Some(at(1, &q)), usize::MAX).finish(&mut s);
            change(&mut q);
            // Same rows, same call: the parts split ahead are used as they are.
            assert_eq!(queries_for(&mut s, at(1, &q)), Some(64));
            assert_eq!(held_queries(&s, rows, d, 64), first);
            // Same rows in a later call (the queries changed in place since): split again.
            SplitAhead::new(&mut s, Some(at(1, &q)), usize::MAX).finish(&mut s);
            let stale = wanted(&q);
            change(&mut q);
            assert_eq!(queries_for(&mut s, at(2, &q)), Some(64));
            assert_ne!(held_queries(&s, rows, d, 64), stale);
            assert_eq!(held_queries(&s, rows, d, 64), wanted(&q));
            // A product with too few groups for the split: nothing is split ahead.
            SplitAhead::new(&mut s, Some(at(3, &q)), rows).finish(&mut s);
            assert!(s.ahead.is_none());
            let stale = wanted(&q);
            change(&mut q);
            assert_eq!(queries_for(&mut s, at(3, &q)), Some(64));
            assert_ne!(held_queries(&s, rows, d, 64), stale);
            assert_eq!(held_queries(&s, rows, d, 64), wanted(&q));
        }
    }
}
