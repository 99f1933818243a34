//! Criterion benches of the Rust kernels: `cargo bench --bench kernels`.
//!
//! Throughput is reported in elements of the (B, Tq, Tv) score matrix; multiply by 4·D for
//! FLOP. The side-by-side table against PyTorch / JAX / Keras is `benches/compare.py`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use luong::{Attention, Isa, Masks, ScoreMode, ValueMask};
use ndarray::{Array2, Array3};

fn inputs(b: usize, tq: usize, tv: usize, d: usize) -> (Array3<f32>, Array3<f32>, Array3<f32>) {
    // A cheap deterministic fill; the values only need to be ordinary.
    let fill = |shape: (usize, usize, usize), salt: usize| {
        Array3::from_shape_fn(shape, |(i, j, k)| {
            (((i * 31 + j * 17 + k * 7 + salt) % 97) as f32 - 48.0) / 48.0
        })
    };
    (
        fill((b, tq, d), 1),
        fill((b, tv, d), 2),
        fill((b, tv, d), 3),
    )
}

fn forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward_f32");
    g.sample_size(20);
    let shapes = [
        (8, 512, 512, 64),
        (2, 2048, 2048, 64),
        (32, 128, 128, 64),
        (8, 1, 4096, 64),
        (1, 1, 8192, 64),
    ];
    for (b, tq, tv, d) in shapes {
        let (q, k, v) = inputs(b, tq, tv, d);
        g.throughput(Throughput::Elements((b * tq * tv) as u64));
        let id = format!("{b}x{tq}x{tv}x{d}");
        g.bench_function(BenchmarkId::new("dot", &id), |bench| {
            let attn = Attention::new(ScoreMode::Dot);
            bench.iter(|| {
                attn.forward(q.view(), v.view(), Some(k.view()), &Masks::default())
                    .unwrap()
            })
        });
    }
    let (b, tq, tv, d) = (8, 512, 512, 64);
    let (q, k, v) = inputs(b, tq, tv, d);
    g.throughput(Throughput::Elements((b * tq * tv) as u64));
    let keys = Array2::from_shape_fn((b, tv), |(i, j)| (i + j) % 5 != 0);
    g.bench_function("dot_value_mask_causal/8x512x512x64", |bench| {
        let masks = Masks {
            value: Some(ValueMask::Keys(keys.view())),
            causal: true,
            ..Masks::default()
        };
        let attn = Attention::new(ScoreMode::Dot);
        bench.iter(|| {
            attn.forward(q.view(), v.view(), Some(k.view()), &masks)
                .unwrap()
        })
    });
    g.bench_function("dot_returned_scores/8x512x512x64", |bench| {
        let attn = Attention::new(ScoreMode::Dot).return_scores(true);
        bench.iter(|| {
            attn.forward(q.view(), v.view(), Some(k.view()), &Masks::default())
                .unwrap()
        })
    });
    let (q, k, v) = inputs(8, 128, 128, 64);
    g.throughput(Throughput::Elements(8 * 128 * 128));
    g.bench_function("concat/8x128x128x64", |bench| {
        let attn = Attention::new(ScoreMode::Concat).scale(0.5);
        bench.iter(|| {
            attn.forward(q.view(), v.view(), Some(k.view()), &Masks::default())
                .unwrap()
        })
    });
    g.finish();
}

fn isas(c: &mut Criterion) {
    let mut g = c.benchmark_group("isa_dot_f32_4x256x256x64");
    g.sample_size(20);
    let (q, k, v) = inputs(4, 256, 256, 64);
    g.throughput(Throughput::Elements(4 * 256 * 256));
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx] {
        let attn = Attention::new(ScoreMode::Dot).isa(isa);
        if attn.effective_isa() != isa {
            continue;
        }
        g.bench_function(format!("{isa:?}"), |bench| {
            bench.iter(|| {
                attn.forward(q.view(), v.view(), Some(k.view()), &Masks::default())
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, forward, isas);
criterion_main!(benches);
