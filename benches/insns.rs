//! `cargo bench --bench insns -- inputs|forward|backward [B TQ TV D]`: the inputs of one f32 dot
//! attention call, then nothing more, one forward, or one forward and its backward, on one
//! thread, on the family `LUONG_ISA` picks. The workload `benches/qemu/arm_insns.sh` counts the
//! executed instructions of under qemu, the `inputs` run being subtracted from the others.
//! Without `--bench` (as `cargo test --all-targets` runs it) a tiny shape.

use luong::{Attention, Isa, Masks};
use ndarray::Array3;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let bench = std::env::args().any(|a| a == "--bench");
    let mode = args.first().map_or("forward", String::as_str);
    let dims: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (b, tq, tv, d) = match dims[..] {
        [b, tq, tv, d] => (b, tq, tv, d),
        _ if bench => (4, 256, 256, 64),
        _ => (1, 8, 8, 4),
    };
    luong::set_num_threads(1).expect("one thread");
    let fill = |n: usize, t: usize, f: f32| {
        Array3::from_shape_fn((n, t, d), |(i, j, k)| {
            ((i * 31 + j * 7 + k) as f32 * f).sin()
        })
    };
    let (q, k, v) = (fill(b, tq, 0.37), fill(b, tv, 0.71), fill(b, tv, 0.13));
    let attn = Attention::default();
    let masks = Masks::default();
    let mut check = q.sum() + k.sum() + v.sum();
    if mode != "inputs" {
        let out = attn
            .forward(q.view(), v.view(), Some(k.view()), &masks)
            .expect("valid");
        check += out.output.sum();
        if mode == "backward" {
            let g = attn
                .backward(
                    q.view(),
                    v.view(),
                    Some(k.view()),
                    &masks,
                    out.output.view(),
                )
                .expect("valid");
            check += g.query.sum();
        }
    }
    let flop = 4 * b * tq * tv * d;
    println!(
        "{} {mode} (B, Tq, Tv, D) = ({b}, {tq}, {tv}, {d}), {flop} forward FLOP, checksum {check}",
        Isa::detect().name()
    );
}
