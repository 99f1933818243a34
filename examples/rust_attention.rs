//! `cargo run --release --example rust_attention`: luong from Rust, without Python.
//!
//! Runs causal self-attention with a padding mask on a small batch, checks that the weights
//! form a distribution over the visible keys, then takes one gradient step on the query with
//! the memory-efficient backward (`forward_saved` + `backward_saved`) and shows the loss fall.
//! It first prints the kernel family it runs on (`avx512`, `avx2`, `neon`, ...).

use luong::{Attention, AttentionError, Isa, Masks, ScoreMode, ValueMask};
use ndarray::{Array2, Array3, Axis};

fn main() -> Result<(), AttentionError> {
    let (b, t, d) = (2, 6, 8);
    // Deterministic inputs without a random-number crate.
    let wave = |i: usize, j: usize, k: usize, f: f32| ((i * 31 + j * 7 + k) as f32 * f).sin();
    let mut query = Array3::from_shape_fn((b, t, d), |(i, j, k)| wave(i, j, k, 0.37));
    let value = Array3::from_shape_fn((b, t, d), |(i, j, k)| wave(i, j, k, 0.71));
    // The second sequence is padded: its last two positions are not keys.
    let keys = Array2::from_shape_fn((b, t), |(i, j)| i == 0 || j < t - 2);
    let masks = Masks {
        value: Some(ValueMask::Keys(keys.view())),
        causal: true,
        ..Masks::default()
    };
    let attn = Attention::new(ScoreMode::Dot)
        .scale(1.0 / (d as f64).sqrt())
        .return_scores(true);
    // The kernel family this CPU runs (`LUONG_ISA` can pick a lower one).
    println!("kernel family: {}", Isa::detect().name());

    let out = attn.forward(query.view(), value.view(), None, &masks)?;
    let weights = out.scores.expect("asked for");
    println!("output {:?}, weights {:?}", out.output.dim(), weights.dim());
    for (i, row) in weights.index_axis(Axis(0), 1).outer_iter().enumerate() {
        let visible: f32 = row.iter().take(i + 1).sum();
        println!("  batch 1, query {i}: weights {row:.3}, sum over visible keys {visible:.6}");
    }

    // Gradient descent on the query towards a target output: loss = ½ |output - target|².
    let target = Array3::from_elem((b, t, d), 0.25f32);
    let attn = attn.return_scores(false);
    for step in 0..5 {
        let saved = attn.forward_saved(query.view(), value.view(), None, &masks)?;
        let diff = &saved.output - &target;
        let loss = 0.5 * diff.iter().map(|x| x * x).sum::<f32>();
        let grads = attn.backward_saved(
            query.view(),
            value.view(),
            None,
            &masks,
            &saved,
            diff.view(),
        )?;
        query.scaled_add(-0.5, &grads.query);
        println!("step {step}: loss {loss:.5}");
    }
    Ok(())
}
