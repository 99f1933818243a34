//! Results are bitwise identical for 1, 2 and 3 threads, serial or pooled, with every option.

mod common;

use common::Rng;
use luong::{set_num_threads, Attention, Dropout, Masks, ScoreMode, ValueMask};

#[test]
fn bitwise_identical_across_thread_counts() {
    let mut rng = Rng(21);
    // Large enough to go through the pool (> 1 MFLOP) with many blocks, odd sizes on purpose.
    let q = rng.array3((3, 131, 40), 1.0).mapv(|x| x as f32);
    let k = rng.array3((3, 97, 40), 1.0).mapv(|x| x as f32);
    let v = rng.array3((3, 97, 24), 1.0).mapv(|x| x as f32);
    let vm = rng.mask2((3, 97), 0.7);
    let qm = rng.mask2((3, 131), 0.8);
    for mode in [ScoreMode::Dot, ScoreMode::Concat] {
        let attn = Attention::new(mode)
            .scale(0.3)
            .return_scores(true)
            .dropout(Dropout {
                rate: 0.2,
                seed: 5,
                call: 3,
            });
        let masks = Masks {
            query: Some(qm.view()),
            value: Some(ValueMask::Keys(vm.view())),
            causal: true,
        };
        let mut results = Vec::new();
        for threads in [1, 2, 3] {
            set_num_threads(threads).unwrap();
            results.push(
                attn.forward(q.view(), v.view(), Some(k.view()), &masks)
                    .unwrap(),
            );
        }
        set_num_threads(2).unwrap();
        for (t, r) in results.iter().enumerate().skip(1) {
            // Bitwise: compare the bit patterns (NaN-safe, and -0.0 != 0.0).
            let bits = |a: &ndarray::Array3<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&r.output),
                bits(&results[0].output),
                "{mode:?} output, {} threads vs 1",
                t + 1
            );
            let (s, s0) = (
                r.scores.as_ref().unwrap(),
                results[0].scores.as_ref().unwrap(),
            );
            assert_eq!(bits(s), bits(s0), "{mode:?} scores, {} threads vs 1", t + 1);
        }
    }
}

#[test]
fn zero_threads_is_an_error() {
    assert!(set_num_threads(0).is_err());
}
