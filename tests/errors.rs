//! Every bad input is an `Err` whose message names the argument and the shapes; never a panic.

use luong::{Attention, AttentionError, Masks, MasksNd, ScoreMode, ValueMask};
use ndarray::{Array2, Array3, ArrayD, IxDyn};

fn nd(shape: &[usize]) -> ArrayD<f32> {
    ArrayD::zeros(IxDyn(shape))
}

fn err(
    q: &[usize],
    v: &[usize],
    k: Option<&[usize]>,
    qm: Option<&[usize]>,
    vm: Option<&[usize]>,
) -> String {
    let (q, v, k) = (nd(q), nd(v), k.map(nd));
    let (qm, vm) = (
        qm.map(|s| ArrayD::from_elem(IxDyn(s), true)),
        vm.map(|s| ArrayD::from_elem(IxDyn(s), true)),
    );
    let masks = MasksNd {
        query: qm.as_ref().map(|m| m.view()),
        value: vm.as_ref().map(|m| m.view()),
        causal: false,
    };
    Attention::default()
        .forward_nd(q.view(), v.view(), k.as_ref().map(|k| k.view()), &masks)
        .expect_err("bad input accepted")
        .to_string()
}

fn has_all(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} lacks {p:?}");
    }
}

#[test]
fn shape_errors_name_arguments_and_shapes() {
    has_all(
        &err(&[3], &[2, 4, 3], None, None, None),
        &["`query`", "(3,)"],
    );
    has_all(
        &err(&[2, 4, 3], &[2, 5, 4], None, None, None),
        &["`value`", "(2, 5, 4)", "`query`", "(2, 4, 3)", "(D)"],
    );
    has_all(
        &err(&[2, 4, 3], &[2, 5, 4], Some(&[2, 6, 3]), None, None),
        &["`key`", "(2, 6, 3)", "(2, 5, 4)", "(Tv)"],
    );
    has_all(
        &err(&[2, 4, 3], &[3, 5, 3], None, None, None),
        &["`value`", "(3, 5, 3)", "broadcast"],
    );
    has_all(
        &err(&[2, 4, 3], &[2, 5, 3], None, Some(&[2, 5]), None),
        &["`query_mask`", "(2, 5)", "Tq"],
    );
    has_all(
        &err(&[2, 4, 3], &[2, 5, 3], None, None, Some(&[2, 4])),
        &["`value_mask`", "(2, 4)", "Tv"],
    );
    has_all(
        &err(&[2, 4, 3], &[2, 5, 3], None, None, Some(&[2, 4, 4])),
        &["`value_mask`", "(2, 4, 4)"],
    );
    has_all(
        &err(&[2, 4, 3], &[2, 5, 3], None, None, Some(&[3, 5])),
        &["`value_mask`", "(3, 5)", "broadcast"],
    );
    // A mask may not grow the batch: (2, 2, 5) against batch (2,) is a rank error, not a broadcast.
    has_all(
        &err(&[2, 4, 3], &[2, 5, 3], None, None, Some(&[2, 2, 4, 5])),
        &["`value_mask`", "(2, 2, 4, 5)"],
    );
}

#[test]
fn three_d_api_checks_batch_and_masks() {
    let q = Array3::<f64>::zeros((2, 3, 4));
    let v = Array3::<f64>::zeros((3, 5, 4));
    let e = Attention::default()
        .forward(q.view(), v.view(), None, &Masks::default())
        .unwrap_err();
    assert!(
        matches!(e, AttentionError::Mismatch { arg: "value", .. }),
        "{e}"
    );
    let v = Array3::<f64>::zeros((2, 5, 4));
    let bad = Array2::from_elem((2, 4), true);
    let m = Masks {
        value: Some(ValueMask::Keys(bad.view())),
        ..Masks::default()
    };
    let e = Attention::default()
        .forward(q.view(), v.view(), None, &m)
        .unwrap_err();
    has_all(&e.to_string(), &["`value_mask`", "(2, 4)", "(2, 3, 5)"]);
}

#[test]
fn element_count_overflow_is_too_large_not_a_panic() {
    // Zero-strided views of a single element: huge logical shapes, no memory.
    let one = [0.0f32];
    let q = ndarray::ArrayView::from(&one[..])
        .into_shape_with_order((1, 1, 1))
        .unwrap();
    let big = q.broadcast((1usize << 20, 1usize << 22, 1)).unwrap();
    let e = Attention::default()
        .return_scores(true)
        .forward(big, big, None, &Masks::default())
        .unwrap_err();
    assert!(matches!(e, AttentionError::TooLarge { .. }), "{e}");
}

#[test]
fn unknown_score_mode_is_an_error() {
    assert!(ScoreMode::parse("additive")
        .unwrap_err()
        .to_string()
        .contains("additive"));
    assert_eq!(ScoreMode::parse("concat").unwrap(), ScoreMode::Concat);
}
