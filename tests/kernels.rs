//! The fast kernels (AVX-512, AVX2 + FMA) against the portable path (the stage functions) and
//! against a float64 run, over shapes that hit every tile tail, both score paths (packed Kᵀ and
//! key rows in place), the concat fallback, causal skipping and its exceptions.

mod common;

use common::{assert_close, Rng};
use luong::{Attention, Dropout, Isa, Masks, ScoreMode, ValueMask};
use ndarray::{Array2, Array3};

#[derive(Clone, Copy, Debug)]
struct Shape {
    b: usize,
    tq: usize,
    tv: usize,
    d: usize,
    dv: usize,
}

fn shapes() -> Vec<Shape> {
    let mut rng = Rng(41);
    let pick = |rng: &mut Rng, xs: &[usize]| xs[rng.below(xs.len())];
    let mut out = vec![
        Shape {
            b: 2,
            tq: 64,
            tv: 64,
            d: 64,
            dv: 64,
        },
        Shape {
            b: 1,
            tq: 1,
            tv: 100,
            d: 16,
            dv: 64,
        },
        Shape {
            b: 3,
            tq: 70,
            tv: 33,
            d: 17,
            dv: 65,
        },
    ];
    for _ in 0..40 {
        out.push(Shape {
            b: 1 + rng.below(3),
            tq: pick(&mut rng, &[1, 3, 7, 8, 13, 64, 70]),
            tv: pick(&mut rng, &[1, 5, 16, 31, 33, 64, 100]),
            d: pick(&mut rng, &[1, 7, 16, 17, 64]),
            dv: pick(&mut rng, &[1, 15, 16, 33, 64, 65]),
        });
    }
    out
}

struct Case {
    q: Array3<f32>,
    k: Array3<f32>,
    v: Array3<f32>,
    keys: Array2<bool>,
    full: Array3<bool>,
    qm: Array2<bool>,
}

fn case(s: Shape, rng: &mut Rng, magnitude: f64) -> Case {
    let f = |a: Array3<f64>| a.mapv(|x| x as f32);
    let mut keys = rng.mask2((s.b, s.tv), 0.7);
    keys.row_mut(0).fill(false); // fully masked rows, with and without causal
    Case {
        q: f(rng.array3((s.b, s.tq, s.d), magnitude)),
        k: f(rng.array3((s.b, s.tv, s.d), magnitude)),
        v: f(rng.array3((s.b, s.tv, s.dv), 1.0)),
        keys,
        full: rng.mask3((s.b, s.tq, s.tv), 0.7),
        qm: rng.mask2((s.b, s.tq), 0.8),
    }
}

/// Runs `attn` on every ISA the CPU has and compares with the portable path.
fn compare_isas(label: &str, attn: &Attention, c: &Case, masks: &Masks<'_>, tol: f64) {
    let portable = attn.clone().isa(Isa::Scalar);
    let want = portable
        .forward(c.q.view(), c.v.view(), Some(c.k.view()), masks)
        .unwrap();
    for isa in [Isa::Avx2, Isa::Avx512, Isa::Amx] {
        let fast = attn.clone().isa(isa);
        if fast.effective_isa() != isa {
            continue; // this CPU lacks it
        }
        let got = fast
            .forward(c.q.view(), c.v.view(), Some(c.k.view()), masks)
            .unwrap();
        let l = format!("{label} {isa:?}");
        assert_close(
            &format!("{l} output"),
            got.output.view(),
            want.output.view(),
            tol,
            tol,
        );
        if let (Some(g), Some(w)) = (&got.scores, &want.scores) {
            assert_close(&format!("{l} weights"), g.view(), w.view(), tol, tol);
        }
    }
}

/// float32 rounding of a score is about eps·Σ|terms|; weights and outputs move by that
/// (times |v| ≤ 1 here). 8× covers the different summation orders and the fast exp's ulps.
fn tolerance(mode: ScoreMode, s: Shape, magnitude: f64, scale: f64) -> f64 {
    let terms = match mode {
        ScoreMode::Dot => s.d as f64 * magnitude * magnitude * scale,
        ScoreMode::Concat => s.d as f64 * 1.3,
    };
    8.0 * f32::EPSILON as f64 * (1.0 + terms)
}

/// The six settings every case runs under: returned weights or not, the query, value (per key
/// or per score) and causal masks, and dropout.
fn variant(mode: ScoreMode, v: usize, c: &Case) -> (Attention, Masks<'_>) {
    let mut attn = Attention::new(mode).scale(0.4).concat_score_weight(1.3);
    attn = attn.return_scores(v.is_multiple_of(2));
    if v == 5 {
        attn = attn.dropout(Dropout {
            rate: 0.25,
            seed: 3,
            call: 1,
        });
    }
    let masks = Masks {
        query: (v >= 2).then(|| c.qm.view()),
        value: match v {
            2 | 5 => Some(ValueMask::Keys(c.keys.view())),
            3 => Some(ValueMask::Scores(c.full.view())),
            _ => None,
        },
        causal: v == 1 || v >= 4,
    };
    (attn, masks)
}

#[test]
fn fast_paths_equal_portable_path() {
    let mut rng = Rng(42);
    for (n, s) in shapes().into_iter().enumerate() {
        let magnitude = [0.5, 1.0, 3.0][n % 3];
        let c = case(s, &mut rng, magnitude);
        for mode in [ScoreMode::Dot, ScoreMode::Concat] {
            for v in 0..6 {
                let (attn, masks) = variant(mode, v, &c);
                let label = format!("{s:?} {mode:?} variant {v}");
                let tol = tolerance(mode, s, magnitude, 0.4);
                compare_isas(&label, &attn, &c, &masks, tol);
            }
        }
    }
}

/// Items long enough in keys that each one's last combine splits the next item's queries ahead
/// (a thread's items run in order, the next one in the same batch element or the next, the last
/// of a batch element shorter), in every variant: the tiles still equal the portable path.
#[test]
fn items_with_queries_split_ahead_equal_portable_path() {
    let mut rng = Rng(43);
    let s = Shape {
        b: 2,
        tq: 300,
        tv: 512,
        d: 64,
        dv: 64,
    };
    let c = case(s, &mut rng, 1.0);
    for v in 0..6 {
        let (attn, masks) = variant(ScoreMode::Dot, v, &c);
        let label = format!("{s:?} variant {v}");
        let tol = tolerance(ScoreMode::Dot, s, 1.0, 0.4);
        compare_isas(&label, &attn, &c, &masks, tol);
    }
}

#[test]
fn concat_falls_back_to_tanh_for_large_inputs() {
    // |2·s·q| > 40: the exponential form would overflow; the fallback must give plain tanh.
    let s = Shape {
        b: 2,
        tq: 9,
        tv: 20,
        d: 16,
        dv: 8,
    };
    let mut rng = Rng(43);
    let c = case(s, &mut rng, 50.0);
    let attn = Attention::new(ScoreMode::Concat)
        .scale(0.5)
        .return_scores(true);
    compare_isas(
        "concat large",
        &attn,
        &c,
        &Masks::default(),
        tolerance(ScoreMode::Concat, s, 50.0, 0.5),
    );
}

#[test]
fn causal_skipping_keeps_keras_semantics() {
    let s = Shape {
        b: 2,
        tq: 40,
        tv: 40,
        d: 16,
        dv: 8,
    };
    let mut rng = Rng(44);
    let mut c = case(s, &mut rng, 1.0);
    // A NaN in the last key of batch 1: Keras's products make every row of that batch NaN,
    // also rows that cannot see the key (NaN · 0 is NaN).
    c.k[[1, 39, 0]] = f32::NAN;
    let masks = Masks {
        causal: true,
        ..Masks::default()
    };
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx] {
        let out = Attention::default()
            .isa(isa)
            .forward(c.q.view(), c.v.view(), Some(c.k.view()), &masks)
            .unwrap();
        assert!(
            out.output
                .index_axis(ndarray::Axis(0), 1)
                .iter()
                .all(|x| x.is_nan()),
            "{isa:?}"
        );
        assert!(
            out.output
                .index_axis(ndarray::Axis(0), 0)
                .iter()
                .all(|x| x.is_finite()),
            "{isa:?}"
        );
    }
    // Rows whose visible keys are all masked take Keras's all-keys weights (the first key of
    // batch 0 masked: row 0 sees only it).
    let mut keys = Array2::from_elem((2, 40), true);
    keys[[0, 0]] = false;
    c.k[[1, 39, 0]] = 0.0;
    let masks = Masks {
        value: Some(ValueMask::Keys(keys.view())),
        causal: true,
        ..Masks::default()
    };
    let attn = Attention::default().return_scores(true);
    compare_isas(
        "all visible keys masked",
        &attn,
        &c,
        &masks,
        tolerance(ScoreMode::Dot, s, 1.0, 1.0),
    );
    let w = attn
        .forward(c.q.view(), c.v.view(), Some(c.k.view()), &masks)
        .unwrap()
        .scores
        .unwrap();
    assert!(
        w.slice(ndarray::s![0, 0, 1..]).iter().any(|&x| x > 0.0),
        "row 0 spreads over hidden keys"
    );
}

#[test]
fn float32_within_1e_5_relative_of_float64() {
    // Issue goal: the f32 fast path stays within 1e-5 of an f64 run, relative to the output scale.
    let s = Shape {
        b: 4,
        tq: 128,
        tv: 96,
        d: 64,
        dv: 64,
    };
    let mut rng = Rng(45);
    let c = case(s, &mut rng, 1.0);
    let d64 = |a: &Array3<f32>| a.mapv(f64::from);
    let scale = 1.0 / (s.d as f64).sqrt();
    for mode in [ScoreMode::Dot, ScoreMode::Concat] {
        let attn = Attention::new(mode).scale(scale).return_scores(true);
        let exact = attn
            .forward(
                d64(&c.q).view(),
                d64(&c.v).view(),
                Some(d64(&c.k).view()),
                &Masks::default(),
            )
            .unwrap();
        let fast = attn
            .forward(c.q.view(), c.v.view(), Some(c.k.view()), &Masks::default())
            .unwrap();
        let vmax = c.v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
        assert_close(
            &format!("{mode:?} output"),
            fast.output.view(),
            exact.output.view(),
            1e-5,
            1e-5 * vmax,
        );
        assert_close(
            &format!("{mode:?} weights"),
            fast.scores.unwrap().view(),
            exact.scores.unwrap().view(),
            1e-5,
            1e-6,
        );
    }
}

/// Decoding shapes (Tq < 8, Tv over 2 chunks of 1024 keys) take the split-keys path
/// (`kernel::decode`): chunk statistics merged in a fixed order. It must equal the portable path
/// within rounding (outputs and the saved statistics) with no mask, a query mask, a key mask
/// (with a fully masked row), a full score mask and the causal mask, keep NaN rows NaN without
/// spreading, give a chunk of -inf scores weight 0, zero query-masked rows, and be bitwise
/// identical for 1, 2 and 3 threads.
#[test]
fn decode_split_keys_equal_portable_path() {
    let mut rng = Rng(47);
    let shapes = [
        Shape {
            b: 3,
            tq: 1,
            tv: 2500,
            d: 40,
            dv: 24,
        },
        Shape {
            b: 2,
            tq: 5,
            tv: 3000,
            d: 64,
            dv: 64,
        },
        Shape {
            b: 1,
            tq: 7,
            tv: 4096,
            d: 17,
            dv: 65,
        },
        Shape {
            b: 2,
            tq: 2,
            tv: 2049,
            d: 64,
            dv: 16,
        },
    ];
    for s in shapes {
        let mut c = case(s, &mut rng, 1.0);
        // Row 0 of batch 0: NaN in the query. Batch element `last`: every key but the last has
        // -inf in dimension 0 and the queries are positive there, so every score but the last
        // is -inf (whole chunks of them) and each row's output is the last value row.
        c.q[[0, 0, 0]] = f32::NAN;
        let last = s.b - 1;
        c.q.slice_mut(ndarray::s![last, .., 0])
            .mapv_inplace(f32::abs);
        c.k.slice_mut(ndarray::s![last, ..s.tv - 1, 0])
            .fill(f32::NEG_INFINITY);
        for variant in 0..5 {
            let query_mask = variant == 1 || variant == 4;
            let masks = Masks {
                query: query_mask.then(|| c.qm.view()),
                value: match variant {
                    2 | 4 => Some(ValueMask::Keys(c.keys.view())), // row 0 fully masked
                    3 => Some(ValueMask::Scores(c.full.view())),
                    _ => None,
                },
                causal: variant == 4,
            };
            let attn = Attention::new(ScoreMode::Dot).scale(0.4);
            let want = attn
                .clone()
                .isa(Isa::Scalar)
                .forward_saved(c.q.view(), c.v.view(), Some(c.k.view()), &masks)
                .unwrap();
            for isa in [Isa::Avx2, Isa::Avx512, Isa::Amx] {
                let attn = attn.clone().isa(isa);
                if attn.effective_isa() != isa {
                    continue; // this CPU lacks it
                }
                let label = format!("{s:?} {isa:?} mask variant {variant}");
                let got = attn
                    .forward_saved(c.q.view(), c.v.view(), Some(c.k.view()), &masks)
                    .unwrap();
                // NaN exactly where the portable path has it (the NaN query row, unless masked).
                for (g, w) in got.output.iter().zip(want.output.iter()) {
                    assert_eq!(g.is_nan(), w.is_nan(), "{label}: NaN pattern");
                }
                let finite = |a: &Array3<f32>| a.mapv(|x| if x.is_nan() { 0.0 } else { x });
                let tol = tolerance(ScoreMode::Dot, s, 1.0, 0.4);
                assert_close(
                    &format!("{label} output"),
                    finite(&got.output).view(),
                    finite(&want.output).view(),
                    tol,
                    tol,
                );
                assert_close(
                    &format!("{label} statistics"),
                    finite(&got.stats).view(),
                    finite(&want.stats).view(),
                    tol,
                    tol,
                );
                for i in 0..s.tq {
                    if (last, i) != (0, 0) && c.qm[[last, i]] | !query_mask {
                        let row = got.output.slice(ndarray::s![last, i, ..]);
                        let v_last = c.v.slice(ndarray::s![last, s.tv - 1, ..]);
                        assert_eq!(row, v_last, "{label}: chunks of -inf scores get weight 0");
                    }
                }
                if query_mask {
                    for ((b, i), &keep) in c.qm.indexed_iter() {
                        if !keep {
                            assert!(
                                got.output
                                    .slice(ndarray::s![b, i, ..])
                                    .iter()
                                    .all(|&x| x == 0.0),
                                "{label}: masked query row ({b}, {i}) must be exactly 0"
                            );
                        }
                    }
                }
                let mut runs = Vec::new();
                for threads in [1, 2, 3] {
                    luong::set_num_threads(threads).unwrap();
                    let r = attn
                        .forward(c.q.view(), c.v.view(), Some(c.k.view()), &masks)
                        .unwrap();
                    runs.push(r.output.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
                luong::set_num_threads(2).unwrap();
                assert_eq!(runs[1], runs[0], "{label}: 2 threads vs 1");
                assert_eq!(runs[2], runs[0], "{label}: 3 threads vs 1");
            }
        }
    }
}

/// Long keys on tiles run in chunks of 512 with an online softmax (`kernel::flash`): the same
/// results as the portable path's one pass, for partial last chunks, masks on keys or on scores,
/// a query mask, a scale, and NaN in a key; the row statistics too.
#[test]
fn long_keys_in_chunks_equal_portable_path() {
    let mut rng = Rng(44);
    for (n, s) in [(40, 1025, 17, 65), (70, 1500, 64, 64), (33, 2600, 32, 16)]
        .into_iter()
        .enumerate()
    {
        let s = Shape {
            b: 2,
            tq: s.0,
            tv: s.1,
            d: s.2,
            dv: s.3,
        };
        let magnitude = [0.5, 1.0, 3.0][n];
        let mut c = case(s, &mut rng, magnitude);
        for variant in 0..4 {
            let attn = Attention::new(ScoreMode::Dot).scale(0.4);
            let masks = Masks {
                query: (variant >= 2).then(|| c.qm.view()),
                value: match variant {
                    1 | 2 => Some(ValueMask::Keys(c.keys.view())),
                    3 => Some(ValueMask::Scores(c.full.view())),
                    _ => None,
                },
                causal: false,
            };
            let label = format!("{s:?} chunks, variant {variant}");
            let tol = tolerance(ScoreMode::Dot, s, magnitude, 0.4);
            compare_isas(&label, &attn, &c, &masks, tol);
            let stats = |isa| {
                let a = attn.clone().isa(isa);
                let saved = a.forward_saved(c.q.view(), c.v.view(), Some(c.k.view()), &masks);
                saved.unwrap().stats
            };
            let want = stats(Isa::Scalar);
            for isa in [Isa::Avx512, Isa::Amx] {
                if attn.clone().isa(isa).effective_isa() == isa {
                    let got = stats(isa);
                    assert_close(
                        &format!("{label} {isa:?} stats"),
                        got.view(),
                        want.view(),
                        tol,
                        tol,
                    );
                }
            }
        }
        // NaN in one key of batch element 1: its rows are NaN, the other element's are not.
        c.k[[1, s.tv - 3, 0]] = f32::NAN;
        let attn = Attention::new(ScoreMode::Dot).isa(Isa::Amx);
        let out = attn
            .forward(c.q.view(), c.v.view(), Some(c.k.view()), &Masks::default())
            .unwrap()
            .output;
        let (b0, b1) = (
            out.index_axis(ndarray::Axis(0), 0),
            out.index_axis(ndarray::Axis(0), 1),
        );
        assert!(b1.iter().all(|x| x.is_nan()), "{s:?}: a NaN key's element");
        assert!(b0.iter().all(|x| x.is_finite()), "{s:?}: the other element");
    }
}
