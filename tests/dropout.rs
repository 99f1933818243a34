//! Dropout: the same seed and call give the same mask; calls differ; the kept fraction and the
//! mean are right within statistical bounds; dropped weights are exactly 0, kept ones scaled.

use luong::{Attention, Dropout, Masks};
use ndarray::Array3;

fn weights(rate: f64, seed: u64, call: u64) -> (Array3<f64>, Array3<f64>) {
    // All scores equal: every weight is 1/Tv before dropout, so the kept ones are 1/(Tv·keep).
    let (b, tq, tv) = (4, 64, 128);
    let q = Array3::<f64>::zeros((b, tq, 8));
    let v = Array3::from_shape_fn((b, tv, 8), |(_, j, d)| ((j * 7 + d) % 5) as f64);
    let out = Attention::default()
        .return_scores(true)
        .dropout(Dropout { rate, seed, call })
        .forward(q.view(), v.view(), None, &Masks::default())
        .unwrap();
    (out.output, out.scores.unwrap())
}

#[test]
fn same_seed_same_mask_and_calls_differ() {
    let (_, a) = weights(0.3, 42, 0);
    let (_, b) = weights(0.3, 42, 0);
    let (_, c) = weights(0.3, 42, 1);
    let (_, d) = weights(0.3, 43, 0);
    assert_eq!(a, b);
    let differ = |x: &Array3<f64>, y: &Array3<f64>| {
        x.iter()
            .zip(y)
            .filter(|(p, q)| (**p == 0.0) != (**q == 0.0))
            .count()
    };
    // Two independent masks at rate 0.3 disagree on 2·0.3·0.7 = 42% of the positions.
    let n = a.len() as f64;
    for (label, other) in [("next call", &c), ("other seed", &d)] {
        let frac = differ(&a, other) as f64 / n;
        assert!(
            (frac - 0.42).abs() < 0.02,
            "{label}: masks disagree on {frac}"
        );
    }
}

#[test]
fn kept_fraction_and_scaling() {
    for rate in [0.1, 0.5, 0.9] {
        let (_, w) = weights(rate, 7, 0);
        let n = w.len() as f64;
        let kept = w.iter().filter(|&&x| x != 0.0).count() as f64;
        let keep = 1.0 - rate;
        // 5 standard deviations of a binomial proportion.
        let sd = (keep * rate / n).sqrt();
        assert!(
            (kept / n - keep).abs() < 5.0 * sd,
            "rate {rate}: kept {}",
            kept / n
        );
        let expect = (1.0 / 128.0) / keep;
        assert!(w.iter().all(|&x| x == 0.0 || (x - expect).abs() < 1e-15));
    }
}

#[test]
fn mean_output_is_preserved() {
    let (no_drop, _) = weights(0.0, 1, 0);
    let mut total = 0.0;
    let calls = 40;
    for call in 0..calls {
        let (o, _) = weights(0.5, 99, call);
        total += o.mean().unwrap();
    }
    let mean = total / calls as f64;
    let base = no_drop.mean().unwrap();
    // Per call, the output mean over 4·64·8 values has a spread of a few 1e-3 here; 40 calls
    // bring the standard error well under 1%.
    assert!((mean - base).abs() / base < 0.01, "mean {mean} vs {base}");
}

#[test]
fn rate_outside_unit_interval_is_an_error() {
    let q = Array3::<f32>::zeros((1, 1, 1));
    for rate in [1.0, 1.5, -0.1, f64::NAN] {
        let r = Attention::default()
            .dropout(Dropout {
                rate,
                seed: 0,
                call: 0,
            })
            .forward(q.view(), q.view(), None, &Masks::default());
        assert!(r.is_err(), "rate {rate} accepted");
    }
}
