//! `Attention::forward` against the naive reference over random configurations, in f64 (to
//! 1e-12) and f32 (to a bound from the float32 rounding of the scores).

mod common;

use common::{assert_close, reference, to_f32, Case, Rng};
use luong::{Attention, Masks, ScoreMode, ValueMask};
use ndarray::{Array2, Array3};

struct Config {
    mode: ScoreMode,
    scale: Option<f64>,
    key: bool,
    value_mask: u8, // 0 none, 1 per key, 2 full score mask
    query_mask: bool,
    causal: bool,
    magnitude: f64,
    shape: (usize, usize, usize, usize, usize),
}

fn configs() -> Vec<Config> {
    let mut rng = Rng(7);
    let mut out = Vec::new();
    for mode in [ScoreMode::Dot, ScoreMode::Concat] {
        for scale in [None, Some(0.37)] {
            for value_mask in 0..3 {
                for causal in [false, true] {
                    let mut shape = (
                        1 + rng.below(3),
                        1 + rng.below(9),
                        1 + rng.below(11),
                        1 + rng.below(20),
                        1 + rng.below(7),
                    );
                    let key = rng.below(2) == 0;
                    if !key {
                        shape.4 = shape.3; // the value doubles as the key: Dv = D
                    }
                    out.push(Config {
                        mode,
                        scale,
                        key,
                        value_mask,
                        query_mask: rng.below(2) == 0,
                        causal,
                        magnitude: [0.1, 1.0, 3.0][rng.below(3)],
                        shape,
                    });
                }
            }
        }
    }
    out
}

struct Inputs {
    q: Array3<f64>,
    k: Array3<f64>,
    v: Array3<f64>,
    vm: Array2<bool>,
    sm: Array3<bool>,
    qm: Array2<bool>,
}

fn inputs(c: &Config, rng: &mut Rng) -> Inputs {
    let (b, tq, tv, d, dv) = c.shape;
    let mut vm = rng.mask2((b, tv), 0.6);
    vm.row_mut(0).fill(false); // a fully masked row: Keras's finite, near-uniform weights
    Inputs {
        q: rng.array3((b, tq, d), c.magnitude),
        k: rng.array3((b, tv, d), c.magnitude),
        v: rng.array3((b, tv, dv), c.magnitude),
        vm,
        sm: rng.mask3((b, tq, tv), 0.6),
        qm: rng.mask2((b, tq), 0.7),
    }
}

fn masks<'a>(c: &Config, x: &'a Inputs) -> Masks<'a> {
    Masks {
        query: c.query_mask.then(|| x.qm.view()),
        value: match c.value_mask {
            1 => Some(ValueMask::Keys(x.vm.view())),
            2 => Some(ValueMask::Scores(x.sm.view())),
            _ => None,
        },
        causal: c.causal,
    }
}

fn case<'a>(c: &Config, x: &'a Inputs, f32_bias: bool) -> Case<'a> {
    Case {
        mode: c.mode,
        scale: c.scale,
        concat_weight: 1.7,
        query: x.q.view(),
        key: if c.key { x.k.view() } else { x.v.view() },
        value: x.v.view(),
        value_mask: (c.value_mask == 1).then(|| x.vm.view()),
        score_mask: (c.value_mask == 2).then(|| x.sm.view()),
        query_mask: c.query_mask.then(|| x.qm.view()),
        causal: c.causal,
        f32_bias,
    }
}

fn layer(c: &Config) -> Attention {
    let mut a = Attention::new(c.mode)
        .concat_score_weight(1.7)
        .return_scores(true);
    if let Some(s) = c.scale {
        a = a.scale(s);
    }
    a
}

#[test]
fn f64_matches_reference_to_1e_12() {
    let mut rng = Rng(1);
    for (n, c) in configs().iter().enumerate() {
        let x = inputs(c, &mut rng);
        let (want_out, want_w) = reference(&case(c, &x, false));
        let key = c.key.then(|| x.k.view());
        let got = layer(c)
            .forward(x.q.view(), x.v.view(), key, &masks(c, &x))
            .unwrap();
        let label = format!("config {n} {:?} {:?}", c.mode, c.shape);
        assert_close(
            &format!("{label} weights"),
            got.scores.unwrap().view(),
            want_w.view(),
            1e-12,
            1e-12,
        );
        assert_close(
            &format!("{label} output"),
            got.output.view(),
            want_out.view(),
            1e-12,
            1e-12,
        );
    }
}

#[test]
fn f32_matches_reference_within_float32_rounding() {
    let mut rng = Rng(2);
    for (n, c) in configs().iter().enumerate() {
        let x = inputs(c, &mut rng);
        // The reference runs on the f32-rounded inputs, so only the kernel's rounding differs.
        let r = |a: &Array3<f64>| to_f32(a).mapv(f64::from);
        let (q, k, v) = (r(&x.q), r(&x.k), r(&x.v));
        let xr = Inputs {
            q,
            k,
            v,
            vm: x.vm.clone(),
            sm: x.sm.clone(),
            qm: x.qm.clone(),
        };
        let (want_out, want_w) = reference(&case(c, &xr, true));
        let (q32, k32, v32) = (to_f32(&xr.q), to_f32(&xr.k), to_f32(&xr.v));
        let key = c.key.then(|| k32.view());
        let got = layer(c)
            .forward(q32.view(), v32.view(), key, &masks(c, &xr))
            .unwrap();
        // A score's rounding error is about eps·Σ|terms| (D·m² for dot, D for concat), and a
        // weight moves by w·Δs; the output by that times |v|. 8× covers the sum's and exp's ulps.
        let (_, _, _, d, _) = c.shape;
        let m = c.magnitude;
        let terms = match c.mode {
            ScoreMode::Dot => d as f64 * m * m * c.scale.unwrap_or(1.0),
            ScoreMode::Concat => d as f64 * 1.7,
        };
        let eps = f32::EPSILON as f64;
        let tol_w = 8.0 * eps * (1.0 + terms);
        let label = format!("config {n} {:?} {:?}", c.mode, c.shape);
        assert_close(
            &format!("{label} weights"),
            got.scores.unwrap().view(),
            want_w.view(),
            tol_w,
            tol_w,
        );
        assert_close(
            &format!("{label} output"),
            got.output.view(),
            want_out.view(),
            tol_w,
            tol_w * m,
        );
    }
}

#[test]
fn query_mask_zeroes_rows_even_when_nan() {
    let q = Array3::from_shape_fn((1, 2, 3), |(_, i, _)| if i == 0 { f32::NAN } else { 0.5 });
    let v = Array3::from_shape_fn((1, 4, 3), |(_, j, d)| (j + d) as f32);
    let qm = Array2::from_shape_vec((1, 2), vec![false, true]).unwrap();
    let masks = Masks {
        query: Some(qm.view()),
        ..Masks::default()
    };
    let out = Attention::default()
        .return_scores(true)
        .forward(q.view(), v.view(), None, &masks)
        .unwrap();
    assert!(out
        .output
        .slice(ndarray::s![0, 0, ..])
        .iter()
        .all(|&x| x == 0.0));
    // The scores of the masked row stay NaN: the query mask touches the output only.
    assert!(out
        .scores
        .unwrap()
        .slice(ndarray::s![0, 0, ..])
        .iter()
        .all(|x| x.is_nan()));
    assert!(out
        .output
        .slice(ndarray::s![0, 1, ..])
        .iter()
        .all(|x| x.is_finite()));
}

#[test]
fn nan_in_one_row_stays_in_that_row() {
    let mut q = Array3::from_elem((1, 3, 2), 0.25f32);
    q[[0, 1, 0]] = f32::NAN;
    let v = Array3::from_shape_fn((1, 4, 2), |(_, j, d)| (j * 2 + d) as f32);
    let out = Attention::default()
        .forward(q.view(), v.view(), None, &Masks::default())
        .unwrap();
    for i in 0..3 {
        let row = out.output.slice(ndarray::s![0, i, ..]);
        assert_eq!(row.iter().all(|x| x.is_nan()), i == 1, "row {i}: {row}");
    }
}

#[test]
fn causal_is_top_left_when_tq_differs_from_tv() {
    let q = Array3::<f64>::zeros((1, 3, 1)); // all scores 0: weights uniform over visible keys
    let v = Array3::from_shape_fn((1, 5, 1), |(_, j, _)| j as f64);
    let masks = Masks {
        causal: true,
        ..Masks::default()
    };
    let out = Attention::default()
        .return_scores(true)
        .forward(q.view(), v.view(), None, &masks)
        .unwrap();
    let w = out.scores.unwrap();
    for i in 0..3 {
        for j in 0..5 {
            let want = if j <= i { 1.0 / (i + 1) as f64 } else { 0.0 };
            assert!(
                (w[[0, i, j]] - want).abs() < 1e-15,
                "w[{i},{j}] = {}",
                w[[0, i, j]]
            );
        }
        assert!((out.output[[0, i, 0]] - i as f64 / 2.0).abs() < 1e-12);
    }
}

#[test]
fn fully_masked_row_rounds_like_keras() {
    // s - 1e9 in f32 rounds to multiples of 64: scores 0 and 40 become -1e9 and -1e9 + 64, so
    // the weights are [e^-64 / (1 + e^-64), 1 / (1 + e^-64)], not uniform and not NaN.
    let q = Array3::from_shape_vec((1, 1, 1), vec![1.0f32]).unwrap();
    let k = Array3::from_shape_vec((1, 2, 1), vec![0.0f32, 40.0]).unwrap();
    let v = Array3::from_shape_vec((1, 2, 1), vec![1.0f32, 2.0]).unwrap();
    let vm = Array2::from_elem((1, 2), false);
    let masks = Masks {
        value: Some(ValueMask::Keys(vm.view())),
        ..Masks::default()
    };
    let out = Attention::default()
        .return_scores(true)
        .forward(q.view(), v.view(), Some(k.view()), &masks)
        .unwrap();
    let w = out.scores.unwrap();
    let small = (-64.0f32).exp();
    assert_eq!(w[[0, 0, 1]], 1.0 / (1.0 + small));
    assert_eq!(w[[0, 0, 0]], small / (1.0 + small));
}
