//! `forward_nd`: any number of leading dims, NumPy broadcasting, strided and reversed views,
//! N-D per-key masks (where Keras misaligns), all equal to per-batch 3-D calls.

mod common;

use common::Rng;
use luong::{Attention, Masks, MasksNd, ScoreMode, ValueMask};
use ndarray::{s, Array, ArrayD, Axis, IxDyn};

fn attn() -> Attention {
    Attention::new(ScoreMode::Dot)
        .scale(0.7)
        .return_scores(true)
}

fn rand(rng: &mut Rng, shape: &[usize]) -> ArrayD<f64> {
    Array::from_shape_fn(IxDyn(shape), |_| rng.uniform())
}

#[test]
fn no_leading_dims() {
    let mut rng = Rng(31);
    let (q, v) = (rand(&mut rng, &[4, 3]), rand(&mut rng, &[6, 3]));
    let out = attn()
        .forward_nd(q.view(), v.view(), None, &MasksNd::default())
        .unwrap();
    assert_eq!(out.output.shape(), &[4, 3]);
    assert_eq!(out.scores.as_ref().unwrap().shape(), &[4, 6]);
    let q3 = q
        .clone()
        .insert_axis(Axis(0))
        .into_dimensionality()
        .unwrap();
    let v3 = v
        .clone()
        .insert_axis(Axis(0))
        .into_dimensionality()
        .unwrap();
    let want = attn()
        .forward(q3.view(), v3.view(), None, &Masks::default())
        .unwrap();
    assert_eq!(
        out.output.as_slice().unwrap(),
        want.output.as_slice().unwrap()
    );
}

#[test]
fn two_leading_dims_broadcast_and_nd_value_mask() {
    let mut rng = Rng(32);
    // query (2, 3, Tq, D), key (3, Tv, D) broadcast over the first dim, value (2, 1, Tv, Dv).
    let q = rand(&mut rng, &[2, 3, 4, 5]);
    let k = rand(&mut rng, &[3, 6, 5]);
    let v = rand(&mut rng, &[2, 1, 6, 2]);
    let vm = Array::from_shape_fn(IxDyn(&[2, 3, 6]), |_| rng.uniform() > -0.2);
    let qm = Array::from_shape_fn(IxDyn(&[3, 4]), |_| rng.uniform() > -0.5);
    let masks = MasksNd {
        query: Some(qm.view()),
        value: Some(vm.view()),
        causal: true,
    };
    let out = attn()
        .forward_nd(q.view(), v.view(), Some(k.view()), &masks)
        .unwrap();
    assert_eq!(out.output.shape(), &[2, 3, 4, 2]);
    for a in 0..2 {
        for b in 0..3 {
            let q3 = q
                .slice(s![a..a + 1, b, .., ..])
                .into_dimensionality()
                .unwrap();
            let k3 = k.slice(s![b..b + 1, .., ..]).into_dimensionality().unwrap();
            let v3 = v
                .slice(s![a..a + 1, 0, .., ..])
                .into_dimensionality()
                .unwrap();
            let vm2 = vm.slice(s![a..a + 1, b, ..]).into_dimensionality().unwrap();
            let qm2 = qm.slice(s![b..b + 1, ..]).into_dimensionality().unwrap();
            let m = Masks {
                query: Some(qm2),
                value: Some(ValueMask::Keys(vm2)),
                causal: true,
            };
            let want = attn().forward(q3, v3, Some(k3), &m).unwrap();
            assert_eq!(
                out.output.slice(s![a, b, .., ..]),
                want.output.index_axis(Axis(0), 0),
                "[{a},{b}] output"
            );
            let sc = out.scores.as_ref().unwrap();
            assert_eq!(
                sc.slice(s![a, b, .., ..]),
                want.scores.unwrap().index_axis(Axis(0), 0),
                "[{a},{b}] scores"
            );
        }
    }
}

#[test]
fn strided_reversed_and_fortran_views_equal_contiguous() {
    let mut rng = Rng(33);
    let q = rand(&mut rng, &[3, 8, 10]);
    let v = rand(&mut rng, &[3, 7, 10]);
    let base = attn()
        .forward_nd(q.view(), v.view(), None, &MasksNd::default())
        .unwrap();
    // Reversed batch axis and every other feature of a wider array.
    let wide = Array::from_shape_fn(IxDyn(&[3, 8, 20]), |ix| q[[2 - ix[0], ix[1], ix[2] / 2]]);
    let strided = wide.slice(s![..;-1, .., ..;2]).into_dyn();
    let f_order = v.t().as_standard_layout().into_owned();
    let f_view = f_order.t();
    let got = attn()
        .forward_nd(strided.view(), f_view.view(), None, &MasksNd::default())
        .unwrap();
    assert_eq!(got.output, base.output);
    assert_eq!(got.scores, base.scores);
}

#[test]
fn zero_sized_dims_give_empty_or_zero_results() {
    let q = ArrayD::<f32>::zeros(IxDyn(&[2, 0, 3]));
    let v = ArrayD::<f32>::zeros(IxDyn(&[2, 4, 3]));
    let out = attn()
        .forward_nd(q.view(), v.view(), None, &MasksNd::default())
        .unwrap();
    assert_eq!(out.output.shape(), &[2, 0, 3]);
    // Tv = 0: nothing to attend to; the output is the empty sum, 0 (as Keras's matmul).
    let q = ArrayD::<f32>::ones(IxDyn(&[2, 3, 3]));
    let v = ArrayD::<f32>::ones(IxDyn(&[2, 0, 3]));
    let out = attn()
        .forward_nd(q.view(), v.view(), None, &MasksNd::default())
        .unwrap();
    assert_eq!(out.output.shape(), &[2, 3, 3]);
    assert!(out.output.iter().all(|&x| x == 0.0));
    // Batch 0 with two leading dims.
    let q = ArrayD::<f32>::ones(IxDyn(&[0, 2, 3, 3]));
    let out = attn()
        .forward_nd(q.view(), q.view(), None, &MasksNd::default())
        .unwrap();
    assert_eq!(out.output.shape(), &[0, 2, 3, 3]);
}
