//! Fuzzes the public Rust API with arbitrary shapes (leading dims included), strides, values
//! (NaN, ±inf, huge), masks and options on every instruction set: `forward_nd` and
//! `backward_nd` must return `Ok` or `Err`, never panic, and an `Ok` must have the promised
//! shapes, weights that are probability rows when inputs are finite and there is no dropout,
//! and fast paths that agree with the portable one.
//!
//! Run: `cargo +nightly fuzz run forward -- -max_total_time=600` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;
use luong::{Attention, Dropout, Isa, MasksNd, ScoreMode};
use ndarray::{ArrayD, IxDyn, Slice, Axis};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn below(&mut self, n: u8) -> usize {
        (self.byte() % n) as usize
    }
    fn value(&mut self) -> f32 {
        match self.byte() {
            250 => f32::NAN,
            251 => f32::INFINITY,
            252 => f32::NEG_INFINITY,
            253 => 1e30,
            254 => -1e30,
            b => (b as f32 - 125.0) / 25.0,
        }
    }
}

fn array(bytes: &mut Bytes<'_>, shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| bytes.value())
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let lead: Vec<usize> = (0..b.below(3)).map(|_| b.below(4)).collect();
    let (tq, tv, d, dv) = (b.below(40), b.below(40), b.below(40), b.below(20));
    let with_key = b.byte() % 2 == 0;
    let dv = if with_key { dv } else { d };
    let shape = |t: usize, f: usize| [&lead[..], &[t, f]].concat();
    let q = array(&mut b, &shape(tq, d));
    let k = array(&mut b, &shape(tv, d));
    let v = array(&mut b, &shape(tv, dv));
    // Odd layouts: reversed rows of the query, a transposed-and-back value.
    let q_view = if b.byte() % 2 == 0 && q.ndim() >= 2 {
        q.slice_axis(Axis(q.ndim() - 2), Slice::new(0, None, -1))
    } else {
        q.view()
    };
    let mode = if b.byte() % 2 == 0 { ScoreMode::Dot } else { ScoreMode::Concat };
    let mut attn = Attention::new(mode).return_scores(b.byte() % 2 == 0);
    if b.byte() % 2 == 0 {
        attn = attn.scale(b.value() as f64);
    }
    attn = attn.concat_score_weight(b.value() as f64);
    let rate = match b.byte() {
        0..=200 => 0.0,
        201..=250 => (b.byte() % 10) as f64 / 10.0,
        251 => 1.0,
        252 => f64::NAN,
        _ => -0.5,
    };
    attn = attn.dropout(Dropout { rate, seed: b.byte() as u64, call: b.byte() as u64 });
    let vm_full = b.byte() % 3;
    let vm = match vm_full {
        0 => None,
        1 => Some(ArrayD::from_shape_fn(IxDyn(&[&lead[..], &[tv]].concat()), |_| b.byte() % 3 != 0)),
        _ => Some(ArrayD::from_shape_fn(IxDyn(&shape(tq, tv)), |_| b.byte() % 3 != 0)),
    };
    let qm = (b.byte() % 2 == 0).then(|| ArrayD::from_shape_fn(IxDyn(&[&lead[..], &[tq]].concat()), |_| b.byte() % 4 != 0));
    let masks = MasksNd {
        query: qm.as_ref().map(|m| m.view()),
        value: vm.as_ref().map(|m| m.view()),
        causal: b.byte() % 2 == 0,
    };
    let key = with_key.then(|| k.view());
    let kv = || key.as_ref().map(|k| k.view());
    let portable = attn.clone().isa(Isa::Scalar).forward_nd(q_view.view(), v.view(), kv(), &masks);
    for isa in [Isa::Avx2, Isa::Avx512] {
        let fast = attn.clone().isa(isa).forward_nd(q_view.view(), v.view(), kv(), &masks);
        match (&portable, &fast) {
            (Ok(p), Ok(f)) => {
                assert_eq!(p.output.shape(), f.output.shape());
                assert_eq!(p.output.shape(), &shape(tq, dv)[..]);
                let all_finite = [&q, &k, &v].iter().all(|a| a.iter().all(|x| x.abs() < 1e3));
                if all_finite && rate == 0.0 {
                    if let Some(w) = &f.scores {
                        for row in w.lanes(Axis(w.ndim() - 1)) {
                            let s: f32 = row.sum();
                            assert!(row.is_empty() || !s.is_finite() || (s - 1.0).abs() < 1e-3, "row sums to {s}");
                        }
                    }
                }
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (p, f) => panic!("portable {:?} vs fast {:?}", p.as_ref().err(), f.as_ref().err()),
        }
    }
    if let Ok(out) = &portable {
        let d_out = ArrayD::from_elem(out.output.raw_dim(), 1.0f32);
        let slow = attn.clone().isa(Isa::Scalar).backward_nd(q_view.view(), v.view(), kv(), &masks, d_out.view());
        // The SIMD backward against the portable one: same errors, same shapes, and on
        // moderate inputs without dropout, gradients within float32 rounding of each other.
        let moderate = [&q, &k, &v].iter().all(|a| a.iter().all(|x| x.abs() < 4.0));
        for isa in [Isa::Avx2, Isa::Avx512] {
            let fast = attn.clone().isa(isa).backward_nd(q_view.view(), v.view(), kv(), &masks, d_out.view());
            match (&slow, &fast) {
                (Ok(s), Ok(f)) => {
                    let pairs = [(&s.query, &f.query), (&s.value, &f.value)];
                    for (a, b) in pairs.into_iter().chain(s.key.as_ref().zip(f.key.as_ref())) {
                        assert_eq!(a.shape(), b.shape());
                        let big = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                        if moderate && rate == 0.0 && big.is_finite() {
                            for (x, y) in a.iter().zip(b.iter()) {
                                assert!((x - y).abs() <= 1e-3 * (1.0 + big), "{x} vs {y} ({isa:?})");
                            }
                        }
                    }
                }
                (Err(a), Err(b)) => assert_eq!(a, b),
                (p, f) => panic!("backward: portable {:?} vs fast {:?}", p.as_ref().err(), f.as_ref().err()),
            }
        }
    }
});
