#!/usr/bin/env bash
# Executed guest instructions per FLOP of the aarch64 kernels under qemu-user, NEON against the
# portable family (LUONG_ISA=scalar), and the executed instruction mix (insn_mix.c, a qemu TCG
# plugin). Needs what scripts/portability installs; plus gcc for the plugin.
#   bash benches/qemu/arm_insns.sh [B TQ TV D]        (default 4 256 256 64)
set -euo pipefail
cd "$(dirname "$0")/../.."
dims=("${@:-4 256 256 64}")
read -r b tq tv d <<<"${dims[*]}"
arm=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
cargo build --release --quiet --target $arm --bench insns
bin=$(ls -t target/$arm/release/deps/insns-* | grep -v '\.d$' | head -1)
plugin=target/qemu-insn-mix.so
gcc -O2 -shared -fPIC -o $plugin benches/qemu/insn_mix.c
count() {  # family mode -> "instructions vfma sfma loads stores"
    LUONG_ISA=$1 qemu-aarch64 -L /usr/aarch64-linux-gnu -plugin $plugin -d plugin \
        "$bin" --bench "$2" "$b" "$tq" "$tv" "$d" 2>&1 >/dev/null |
        sed -E 's/[^0-9 ]//g; s/ +/ /g; s/^ //'
}
flop=$((4 * b * tq * tv * d))
echo "(B, Tq, Tv, D) = ($b, $tq, $tv, $d): forward $flop FLOP, backward 2.5x that (5 products)"
printf '%-8s %-9s %14s %10s %10s %10s %10s\n' family call "instr/FLOP" "vec FMA" "sc FMA" \
    loads stores
for isa in neon scalar; do
    read -r i0 v0 s0 l0 t0 <<<"$(count $isa inputs)"
    read -r i1 v1 s1 l1 t1 <<<"$(count $isa forward)"
    read -r i2 v2 s2 l2 t2 <<<"$(count $isa backward)"
    fwd="$((i1 - i0)) $((v1 - v0)) $((s1 - s0)) $((l1 - l0)) $((t1 - t0)) $flop"
    bwd="$((i2 - i1)) $((v2 - v1)) $((s2 - s1)) $((l2 - l1)) $((t2 - t1)) $((flop * 5 / 2))"
    for row in "forward $fwd" "backward $bwd"; do
        read -r call n v s l t f <<<"$row"
        printf '%-8s %-9s %14.3f %10d %10d %10d %10d\n' $isa "$call" \
            "$(echo "$n / $f" | bc -l)" "$v" "$s" "$l" "$t"
    done
done
