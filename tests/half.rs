//! Half-precision storage (`Attention::forward_nd_half`, `backward_nd_half`): the f32
//! computation on the widened inputs, rounded once; float16 masks with Keras's 65504.

mod common;

use common::Rng;
use half::{bf16, f16};
use luong::{Attention, Half, MasksNd, ScoreMode};
use ndarray::{ArrayD, IxDyn};

fn round<H: Half>(a: &ArrayD<f32>) -> ArrayD<H> {
    let mut out = ArrayD::from_elem(a.raw_dim(), H::default());
    H::narrow(
        a.as_standard_layout().as_slice().unwrap(),
        out.as_slice_mut().unwrap(),
    );
    out
}

fn widen<H: Half>(a: &ArrayD<H>) -> ArrayD<f32> {
    let mut out = ArrayD::zeros(a.raw_dim());
    H::widen(a.as_slice().unwrap(), out.as_slice_mut().unwrap());
    out
}

fn check<H: Half + PartialEq + std::fmt::Debug>() {
    let mut rng = Rng(11);
    let shape = |s: &[usize]| IxDyn(s);
    let arr = |rng: &mut Rng, s: &[usize]| -> ArrayD<H> {
        let x = rng
            .array3((s[0], s[1], s[2]), 1.0)
            .mapv(|x| x as f32)
            .into_dyn();
        round::<H>(&x.into_shape_with_order(shape(s)).unwrap())
    };
    let (q, k, v) = (
        arr(&mut rng, &[2, 9, 16]),
        arr(&mut rng, &[2, 70, 16]),
        arr(&mut rng, &[2, 70, 8]),
    );
    let d = arr(&mut rng, &[2, 9, 8]);
    let mut keys = rng.mask2((2, 70), 0.7);
    keys.column_mut(0).fill(true);
    let keys = keys.into_dyn();
    let masks = MasksNd {
        value: Some(keys.view()),
        causal: true,
        ..MasksNd::default()
    };
    let attn = Attention::new(ScoreMode::Dot)
        .scale(0.3)
        .return_scores(true);
    let got = attn
        .forward_nd_half(q.view(), v.view(), Some(k.view()), &masks)
        .unwrap();
    let (qw, kw, vw, dw) = (widen(&q), widen(&k), widen(&v), widen(&d));
    let want = attn
        .forward_nd(qw.view(), vw.view(), Some(kw.view()), &masks)
        .unwrap();
    assert_eq!(got.output, round::<H>(&want.output), "{}", H::NAME);
    assert_eq!(
        got.scores.unwrap(),
        round::<H>(&want.scores.unwrap()),
        "{}",
        H::NAME
    );
    let g = attn
        .backward_nd_half(q.view(), v.view(), Some(k.view()), &masks, d.view())
        .unwrap();
    let gw = attn
        .backward_nd(qw.view(), vw.view(), Some(kw.view()), &masks, dw.view())
        .unwrap();
    assert_eq!(g.query, round::<H>(&gw.query), "{}", H::NAME);
    assert_eq!(g.key.unwrap(), round::<H>(&gw.key.unwrap()), "{}", H::NAME);
    assert_eq!(g.value, round::<H>(&gw.value), "{}", H::NAME);
}

#[test]
fn half_is_the_f32_computation_rounded_once() {
    check::<f16>();
    check::<bf16>();
    // Again, widening into the buffers the earlier calls on this thread kept (other sizes first).
    check::<f16>();
}

#[test]
fn float16_masks_with_65504() {
    // A fully masked row: the weights are the softmax of s - bias, and f32's spacing near 65504
    // (1/128) keeps the scores apart, while near 1e9 (64) it makes them equal.
    let q = ArrayD::from_shape_vec(IxDyn(&[1, 1, 1]), vec![f16::from_f32(1.0)]).unwrap();
    let k = ArrayD::from_shape_vec(
        IxDyn(&[1, 2, 1]),
        vec![f16::from_f32(0.0), f16::from_f32(2.0)],
    )
    .unwrap();
    let none = ndarray::arr1(&[false, false]).into_dyn();
    let none = none.into_shape_with_order(IxDyn(&[1, 2])).unwrap();
    let masks = MasksNd {
        value: Some(none.view()),
        ..MasksNd::default()
    };
    let attn = Attention::new(ScoreMode::Dot).return_scores(true);
    let w = attn
        .forward_nd_half(q.view(), k.view(), None, &masks)
        .unwrap()
        .scores
        .unwrap();
    let (w0, w1) = (w[[0, 0, 0]].to_f32(), w[[0, 0, 1]].to_f32());
    // softmax([0, 2] - 65504) = [0.119, 0.881]; with 1e9 it would be [0.5, 0.5].
    assert!(
        (w0 - 0.1192).abs() < 1e-3 && (w1 - 0.8808).abs() < 1e-3,
        "{w0} {w1}"
    );
}
