//! The public stage functions, each against the naive reference, and composed they equal
//! `forward` bit for bit.

mod common;

use common::{assert_close, reference, Case, Rng};
use luong::{
    apply_query_mask, apply_score_mask, combine, scores, softmax_rows, Attention, Masks, ScoreMode,
    ValueMask,
};

fn case_inputs(
    rng: &mut Rng,
) -> (
    ndarray::Array3<f64>,
    ndarray::Array3<f64>,
    ndarray::Array3<f64>,
) {
    (
        rng.array3((2, 5, 6), 1.0),
        rng.array3((2, 7, 6), 1.0),
        rng.array3((2, 7, 3), 1.0),
    )
}

#[test]
fn stages_compose_to_forward_bitwise() {
    let mut rng = Rng(11);
    let (q, k, v) = case_inputs(&mut rng);
    let vm = rng.mask3((2, 5, 7), 0.5);
    let qm = rng.mask2((2, 5), 0.5);
    for mode in [ScoreMode::Dot, ScoreMode::Concat] {
        let attn = Attention::new(mode)
            .scale(0.6)
            .concat_score_weight(1.3)
            .return_scores(true);
        let masks = Masks {
            query: Some(qm.view()),
            value: Some(ValueMask::Scores(vm.view())),
            causal: true,
        };
        let mut s = scores(&attn, q.view(), k.view()).unwrap();
        apply_score_mask(s.view_mut(), &masks).unwrap();
        softmax_rows(s.view_mut());
        let mut out = combine(s.view(), v.view()).unwrap();
        apply_query_mask(out.view_mut(), qm.view()).unwrap();
        let fwd = attn
            .forward(q.view(), v.view(), Some(k.view()), &masks)
            .unwrap();
        assert_eq!(fwd.scores.unwrap(), s, "{mode:?} weights");
        assert_eq!(fwd.output, out, "{mode:?} output");
    }
}

#[test]
fn scores_match_reference() {
    let mut rng = Rng(12);
    let (q, k, v) = case_inputs(&mut rng);
    for (mode, scale) in [
        (ScoreMode::Dot, None),
        (ScoreMode::Dot, Some(0.3)),
        (ScoreMode::Concat, None),
        (ScoreMode::Concat, Some(2.0)),
    ] {
        let mut attn = Attention::new(mode).concat_score_weight(0.8);
        if let Some(s) = scale {
            attn = attn.scale(s);
        }
        let got = scores(&attn, q.view(), k.view()).unwrap();
        // Raw scores, by hand.
        let want = ndarray::Array3::from_shape_fn((2, 5, 7), |(b, i, j)| {
            let terms = (0..6).map(|d| match mode {
                ScoreMode::Dot => q[[b, i, d]] * k[[b, j, d]],
                ScoreMode::Concat => (scale.unwrap_or(1.0) * (q[[b, i, d]] + k[[b, j, d]])).tanh(),
            });
            let s: f64 = terms.sum();
            match mode {
                ScoreMode::Dot => s * scale.unwrap_or(1.0),
                ScoreMode::Concat => 0.8 * s,
            }
        });
        assert_close(
            &format!("{mode:?} {scale:?}"),
            got.view(),
            want.view(),
            1e-14,
            1e-14,
        );
        // And the full pipeline through the reference agrees with forward.
        let case = Case {
            mode,
            scale,
            concat_weight: 0.8,
            query: q.view(),
            key: k.view(),
            value: v.view(),
            value_mask: None,
            score_mask: None,
            query_mask: None,
            causal: false,
            f32_bias: false,
        };
        let (want_out, _) = reference(&case);
        let got_out = attn
            .forward(q.view(), v.view(), Some(k.view()), &Masks::default())
            .unwrap()
            .output;
        assert_close("output", got_out.view(), want_out.view(), 1e-12, 1e-12);
    }
}

#[test]
fn softmax_rows_sum_to_one_and_keep_order() {
    let mut rng = Rng(13);
    let mut s = rng.array3((3, 4, 9), 20.0);
    let before = s.clone();
    softmax_rows(s.view_mut());
    for (row, orig) in s.rows().into_iter().zip(before.rows()) {
        assert!((row.sum() - 1.0).abs() < 1e-14, "row sums to {}", row.sum());
        for a in 0..9 {
            for b in 0..9 {
                if orig[a] < orig[b] {
                    assert!(row[a] <= row[b]);
                }
            }
        }
    }
}

#[test]
fn mask_subtracts_keras_bias_not_infinity() {
    let mut s = ndarray::Array3::<f32>::from_elem((1, 2, 3), 0.5);
    let vm = ndarray::Array2::from_shape_vec((1, 3), vec![true, false, true]).unwrap();
    let masks = Masks {
        value: Some(ValueMask::Keys(vm.view())),
        causal: true,
        ..Masks::default()
    };
    apply_score_mask(s.view_mut(), &masks).unwrap();
    let biased = 0.5f32 - 1e9f32;
    assert_eq!(
        s.as_slice().unwrap(),
        &[0.5, biased, biased, 0.5, biased, biased]
    );
}

#[test]
fn combine_is_weights_times_value() {
    let w = ndarray::Array3::from_shape_vec((1, 1, 2), vec![0.25f64, 0.75]).unwrap();
    let v = ndarray::Array3::from_shape_vec((1, 2, 2), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let out = combine(w.view(), v.view()).unwrap();
    assert_eq!(out.as_slice().unwrap(), &[0.25 + 2.25, 0.5 + 3.0]);
}
