//! `cargo bench --bench isa_ab`: luong's own paths side by side, float32, in one process with
//! calls interleaved (one call of each path in turn, medians of 200): the AMX tiles against the
//! AVX-512 micro-kernels (and AVX2), with and without returned weights. A path the CPU lacks is
//! skipped and said so. The machine is shared and noisy: only ratios within a run mean much.

use std::time::Instant;

use luong::{Attention, Isa, Masks, ScoreMode};
use ndarray::Array3;

fn inputs(b: usize, tq: usize, tv: usize, d: usize) -> [Array3<f32>; 3] {
    let wave = |(i, j, k): (usize, usize, usize), f: f32| {
        (((i * 131 + j * 17 + k * 7) % 1000) as f32 * f).sin()
    };
    [
        Array3::from_shape_fn((b, tq, d), |x| wave(x, 0.37)),
        Array3::from_shape_fn((b, tv, d), |x| wave(x, 0.71)),
        Array3::from_shape_fn((b, tv, d), |x| wave(x, 0.13)),
    ]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it (and
    // unoptimised): there it makes one call of each path on the smallest shape, not a measurement.
    let calls = if std::env::args().any(|a| a == "--bench") {
        200
    } else {
        1
    };
    println!(
        "best ISA: {:?}; {} threads; medians of {calls} interleaved calls",
        Isa::detect(),
        luong::num_threads()
    );
    let isas: Vec<Isa> = [Isa::Amx, Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|&isa| {
            let has = Attention::default().isa(isa).effective_isa() == isa;
            if !has {
                println!("({isa:?}: not on this CPU, skipped)");
            }
            has
        })
        .collect();
    let shapes = [(8, 512, 512, 64), (2, 2048, 2048, 64), (32, 128, 128, 64)];
    let shapes = if calls == 1 {
        &shapes[2..]
    } else {
        &shapes[..]
    };
    for &(b, tq, tv, d) in shapes {
        let [q, k, v] = inputs(b, tq, tv, d);
        let flop = 4.0 * (b * tq * tv * d) as f64;
        for weights in [false, true] {
            let attns: Vec<Attention> = isas
                .iter()
                .map(|&isa| {
                    Attention::new(ScoreMode::Dot)
                        .return_scores(weights)
                        .isa(isa)
                })
                .collect();
            let mut times = vec![Vec::with_capacity(calls); attns.len()];
            for _ in 0..calls {
                for (attn, t) in attns.iter().zip(&mut times) {
                    let start = Instant::now();
                    let out = attn.forward(q.view(), v.view(), Some(k.view()), &Masks::default());
                    std::hint::black_box(out.unwrap());
                    t.push(start.elapsed().as_secs_f64());
                }
            }
            let medians: Vec<f64> = times
                .iter_mut()
                .map(|t| {
                    t.sort_by(f64::total_cmp);
                    t[t.len() / 2]
                })
                .collect();
            let cells: Vec<String> = isas
                .iter()
                .zip(&medians)
                .map(|(isa, m)| {
                    let vs = medians[0] / m;
                    format!(
                        "{isa:?} {:.3} ms ({:.0} GFLOP/s, {vs:.2}x the first)",
                        m * 1e3,
                        flop / m / 1e9
                    )
                })
                .collect();
            println!(
                "({b}, {tq}, {tv}, {d}) weights {weights:5}: {}",
                cells.join("; ")
            );
        }
    }
}
