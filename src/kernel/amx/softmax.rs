//! The softmax of an AMX item's rows ([`RowSoftmax`]), one row after another, as a pass of its own
//! or as side work between the other block's tile products ([`SideWork`]).

use crate::kernel::item::{mask_fast_row, row_done, scale_row, Ctx, Item};
use crate::kernel::plan::MAX_ITEM_ROWS;
use crate::kernel::simd;
use crate::kernel::softmax::max_of_row;

use super::exp::{self, ExpPass};
use super::side_work::SideWork;

/// Where an AMX item's softmax reads and writes: the raw scores (`ld` floats per row), the
/// weight parts (`kp` wide), the returned weights (`Tv` per row) and each row's length.
#[derive(Clone, Copy)]
pub(crate) struct SoftmaxBufs<'a> {
    pub(crate) raw: *mut f32,
    pub(crate) ld: usize,
    pub(crate) parts: [*mut u16; 3],
    pub(crate) kp: usize,
    /// The returned weights, `Tv` floats per row (null: none are written).
    pub(crate) weights: *mut f32,
    pub(crate) lens: &'a [usize; MAX_ITEM_ROWS],
}

/// The softmax of rows `r .. end` of an AMX item without dropout, one row after another: each
/// row's scale and masks (done one row ahead), `e^(s - max)` split into the weight parts
/// ([`ExpPass`], which also finds the next row's max and normalises the row before's
/// returned weights), the row's statistics and output factor (`inv`). As side work
/// ([`SideWork`]) it runs 32 scores per step between another block's tile products.
pub(crate) struct RowSoftmax<'a, 'c, 'm> {
    ctx: &'a Ctx<'c, 'm, f32>,
    item: Item,
    bufs: SoftmaxBufs<'a>,
    r: usize,
    end: usize,
    max: f32,
    pass: Option<ExpPass>,
    /// The row before's returned weights, to normalise by its 1 / sum during this row's pass.
    pending: Option<(*mut f32, usize, f32)>,
    inv: &'a mut [f32; MAX_ITEM_ROWS],
    stats: Option<&'a mut [f32]>,
    /// Whether every row was scaled and masked up front (for side work: a row's masks in one
    /// step would hold up the tile unit; a pass of their own costs the same as before).
    prepared: bool,
}

impl<'a, 'c, 'm> RowSoftmax<'a, 'c, 'm> {
    /// Scales and masks row `rows.start` (with `prepared`, every row) and finds its max.
    ///
    /// # Safety
    /// AVX-512F; `bufs` holds the item's raw scores for these rows, its weight parts sized for
    /// them, and (with returned weights) `Tv` writable floats per row; nothing else touches
    /// these rows until [`RowSoftmax::finish`].
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn new(
        ctx: &'a Ctx<'c, 'm, f32>,
        item: Item,
        bufs: SoftmaxBufs<'a>,
        rows: std::ops::Range<usize>,
        inv: &'a mut [f32; MAX_ITEM_ROWS],
        stats: Option<&'a mut [f32]>,
        prepared: bool,
    ) -> Self {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let mut sm = RowSoftmax {
                ctx,
                item,
                bufs,
                r: rows.start,
                end: rows.end,
                max: f32::NEG_INFINITY,
                pass: None,
                pending: None,
                inv,
                stats,
                prepared,
            };
            let first = if prepared { sm.end } else { sm.r + 1 };
            for r in sm.r..first.min(sm.end) {
                sm.prepare(r);
            }
            if sm.r < sm.end {
                sm.max = max_of_row::<simd::Avx512>(sm.row(sm.r));
            }
            sm
        }
    }

    /// Row `r`'s scores.
    ///
    /// # Safety
    /// As [`RowSoftmax::new`]; one reference per row at a time.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize) -> &mut [f32] {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            let b = self.bufs;
            std::slice::from_raw_parts_mut(b.raw.add(r * b.ld), b.lens[r])
        }
    }

    /// Row `r`'s scale and masks (before the pass that finds its max).
    #[target_feature(enable = "avx512f")]
    unsafe fn prepare(&self, r: usize) {
        // SAFETY: `RowSoftmax::new`'s contract, which holds for every row this softmax visits.
        unsafe {
            scale_row(self.ctx, self.row(r));
            mask_fast_row(self.ctx, self.item, r, 0, self.row(r));
        }
    }

    /// Starts row `r`'s pass, the next row scaled and masked first.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn start_row(&mut self) {
        // SAFETY: `RowSoftmax::new`'s contract, which holds for every row this softmax visits.
        unsafe {
            let r = self.r;
            let next: &[f32] = if r + 1 < self.end {
                if !self.prepared {
                    self.prepare(r + 1);
                }
                self.row(r + 1)
            } else {
                &[]
            };
            let b = self.bufs;
            let w = (!b.weights.is_null()).then(|| b.weights.add(r * self.ctx.dims.tv));
            let parts = (b.parts, r, b.kp);
            self.pass = Some(ExpPass::new(
                self.row(r),
                self.max,
                parts,
                w,
                next,
                self.pending,
            ));
        }
    }

    /// Ends row `r`'s pass: its factor and statistics, the zeros past its returned weights.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    unsafe fn end_row(&mut self, (sum, next_max): (f32, f32)) {
        // SAFETY: `RowSoftmax::new`'s contract, which holds for every row this softmax visits.
        unsafe {
            let r = self.r;
            self.inv[r] = row_done(false, r, (self.max, sum), self.stats.as_deref_mut());
            let (len, tv) = (self.bufs.lens[r], self.ctx.dims.tv);
            self.pending = None;
            if !self.bufs.weights.is_null() {
                // The returned weights: this row of `scores` (`rows · Tv`, possibly uninitialised)
                // is written in full, `e` by the pass, the zeros here, the scaling by the next.
                let w = self.bufs.weights.add(r * tv);
                std::ptr::write_bytes(w.add(len), 0, tv - len);
                self.pending = Some((w, len, self.inv[r]));
            }
            self.max = next_max;
            self.r += 1;
        }
    }

    /// Runs what is left, then normalises the last row's returned weights.
    ///
    /// # Safety
    /// As [`RowSoftmax::new`].
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn finish(mut self) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            // A row under way goes on step by step, the rest each in one loop.
            while self.pass.is_some() {
                SideWork::step(&mut self);
            }
            while self.r < self.end {
                self.start_row();
                if let Some(mut pass) = self.pass.take() {
                    while !pass.done() {
                        pass.chunk();
                    }
                    self.end_row(pass.finish());
                }
            }
            if let Some((w, len, inv)) = self.pending {
                exp::scale_weights(w, len, inv);
            }
        }
    }
}

impl SideWork for RowSoftmax<'_, '_, '_> {
    fn units(&self) -> usize {
        (self.end - self.r) * (self.bufs.kp / 32)
    }

    /// 32 scores of the current row.
    ///
    /// # Safety
    /// As [`RowSoftmax::new`], in code compiled for AVX-512F.
    #[inline(always)]
    unsafe fn step(&mut self) {
        // SAFETY: within this function's `# Safety` contract, which the caller upholds.
        unsafe {
            if self.r >= self.end {
                return;
            }
            if self.pass.is_none() {
                self.start_row();
            }
            if let Some(pass) = &mut self.pass {
                pass.chunk();
                if pass.done() {
                    let done = pass.finish();
                    self.pass = None;
                    self.end_row(done);
                }
            }
        }
    }
}
