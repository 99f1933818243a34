//! The buffers every other file reads or writes: 64-byte aligned bf16 storage ([`Buf`]), the
//! packed keys and values ([`Packed`]) and the per-thread scratch ([`Scratch`], with the
//! [`QueryRows`] it may hold).

/// A 64-byte aligned buffer of bf16 (as `u16`) that keeps its allocation between uses.
#[derive(Default)]
pub(crate) struct Buf {
    lines: Vec<Line>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

impl Buf {
    /// At least `len` elements, contents unspecified (the packers write all they use).
    pub(super) fn reserve(&mut self, len: usize) {
        let lines = len.div_ceil(32);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line([0; 32]));
        }
    }
    fn bytes(&self) -> usize {
        self.lines.capacity() * 64
    }
    fn ptr(&self) -> *const u16 {
        self.lines.as_ptr().cast()
    }
    fn mut_ptr(&mut self) -> *mut u16 {
        self.lines.as_mut_ptr().cast()
    }
    /// The buffer as a row-major f32 matrix of `mb` blocks of 32 rows by `nb` blocks of 32
    /// columns (a product's C, sharing the alignment): its first element and row stride.
    pub(super) fn f32_block(&mut self, mb: usize, nb: usize) -> (*mut f32, usize) {
        let ld = nb * 32;
        self.reserve(mb * 32 * ld * 2); // two bf16 elements per float
        (self.lines.as_mut_ptr().cast(), ld)
    }
}

/// The three parts' buffers, for reading.
pub(super) fn ptrs(parts: &[Buf; 3]) -> [*const u16; 3] {
    [parts[0].ptr(), parts[1].ptr(), parts[2].ptr()]
}

/// The three parts' buffers, for writing.
pub(super) fn mut_ptrs(parts: &mut [Buf; 3]) -> [*mut u16; 3] {
    let [a, b, c] = parts;
    [a.mut_ptr(), b.mut_ptr(), c.mut_ptr()]
}

/// Keys and values of one batch element in tile layout: `Kᵀ` (`D × Tv`) and `V` (`Tv × Dv`),
/// three parts each.
#[derive(Default)]
pub(crate) struct Packed {
    pub(super) k: [Buf; 3],
    pub(super) v: [Buf; 3],
    /// Tiles along `k` of Kᵀ (`⌈D / 32⌉`) and of V (`⌈Tv / 32⌉`).
    pub(super) k_kt: usize,
    pub(super) v_kt: usize,
}

impl Packed {
    /// The bytes its buffers hold.
    pub(crate) fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(Buf::bytes).sum()
    }
}

/// Per-thread scratch of one work item: the query parts, the raw scores, the weight parts and
/// the output, at 64-byte alignment.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(super) q: [Buf; 3],
    /// Which query rows `q` holds when a [`SplitAhead`](super::side_work::SplitAhead) split them,
    /// and whether exactly.
    pub(super) ahead: Option<(QueryRows, bool)>,
    pub(super) scores: Buf,
    pub(super) p: [Buf; 3],
    pub(super) out: Buf,
}

impl Scratch {
    /// The bytes its buffers hold.
    pub(crate) fn bytes(&self) -> usize {
        let parts = self.q.iter().chain(&self.p);
        parts.map(Buf::bytes).sum::<usize>() + self.scores.bytes() + self.out.bytes()
    }
}

/// Query rows of one item: `rows` rows of `d` floats from `q0`, `ld` apart, in call `call`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct QueryRows {
    pub(crate) call: u64,
    pub(crate) q0: *const f32,
    pub(crate) ld: usize,
    pub(crate) rows: usize,
    pub(crate) d: usize,
}
