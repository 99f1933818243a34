//! The instruction sets luong's kernels run on: what this CPU has ([`Isa::detect`]), and the
//! one rule ([`resolve`]) by which a requested set, from `LUONG_ISA` or from
//! [`Attention::isa`](crate::Attention::isa), becomes the set a call runs on.

use std::sync::OnceLock;

/// The instruction sets the f32 kernels can use. More may be added, so matches outside this
/// crate need a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isa {
    /// AVX-512F, with the forward's two dot products on AMX tiles (AMX-TILE and AMX-BF16, where
    /// the OS grants the tile state): each f32 operand split into three bfloat16 parts, six tile
    /// products per f32 product, error at or below an f32 FMA chain's (see `kernel::amx`).
    /// Everything else runs as [`Isa::Avx512`].
    Amx,
    /// AVX-512F: 16 lanes, masked loads, `vscalefps`.
    Avx512,
    /// AVX2 and FMA: 8 lanes.
    Avx2,
    /// NEON (Advanced SIMD) on aarch64: 4 lanes, 32 registers; part of every aarch64 target.
    Neon,
    /// The portable row-by-row path.
    Scalar,
}

impl Isa {
    /// The best set this CPU supports, or what `LUONG_ISA` (`amx`, `avx512`, `avx2`, `neon`,
    /// `scalar`) asks for when the CPU supports it (to test and benchmark every path on one machine;
    /// `amx` also runs calls of every size on tiles). Detected once.
    /// [`Isa::Amx`] asks Linux for the tile state the first time (`arch_prctl`).
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| resolve(requested_by_env(), Isa::best()))
    }

    /// The name `LUONG_ISA` takes for this set: `amx`, `avx512`, `avx2`, `neon` or `scalar`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
            Isa::Scalar => "scalar",
        }
    }

    /// The set named `name` (as [`Isa::name`] spells it), if any.
    pub fn parse(name: &str) -> Option<Isa> {
        [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar]
            .into_iter()
            .find(|isa| isa.name() == name)
    }

    /// The best set the hardware and the OS offer.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return if amx_available() {
                    Isa::Amx
                } else {
                    Isa::Avx512
                };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            return Isa::Neon;
        }
        #[allow(unreachable_code)]
        Isa::Scalar
    }
}

/// The set a call runs on when `requested` is asked for and `best` is available: the request
/// when the CPU has it (a lower x86 set, or the portable path), else `best`. Asking for
/// [`Isa::Amx`], [`Isa::Neon`] or for nothing gives `best`.
pub(crate) fn resolve(requested: Option<Isa>, best: Isa) -> Isa {
    let x86 = matches!(best, Isa::Amx | Isa::Avx512 | Isa::Avx2);
    match requested {
        Some(Isa::Scalar) => Isa::Scalar,
        Some(Isa::Avx2) if x86 => Isa::Avx2,
        Some(Isa::Avx512) if best == Isa::Amx => Isa::Avx512,
        _ => best,
    }
}

/// What `LUONG_ISA` asks for (read once; unset or unknown: nothing).
pub(crate) fn requested_by_env() -> Option<Isa> {
    static ENV: OnceLock<Option<Isa>> = OnceLock::new();
    *ENV.get_or_init(|| {
        std::env::var("LUONG_ISA")
            .ok()
            .as_deref()
            .and_then(Isa::parse)
    })
}

/// Whether this process can run the AMX tile kernels (checked once; asks Linux for the tile
/// state).
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx_available() -> bool {
    tiles::available()
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    #[cfg(target_os = "linux")]
    use std::arch::asm;
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    use std::sync::OnceLock;

    pub(super) fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| cpu_has_amx() && os_grants_tiles())
    }

    fn cpu_has_amx() -> bool {
        if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("xsave") {
            return false;
        }
        // CPUID leaf 7 exists on every CPU with AVX-512F.
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        if !(amx_bf16 && amx_tile) {
            return false;
        }
        // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves and restores tile state.
        // SAFETY: OSXSAVE is set whenever is_x86_feature_detected!("xsave") holds with OS support;
        // XGETBV with ECX = 0 reads XCR0.
        let xcr0 = unsafe { _xgetbv(0) };
        xcr0 >> 17 & 3 == 3
    }

    #[cfg(target_os = "linux")]
    fn os_grants_tiles() -> bool {
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        const SYS_ARCH_PRCTL: i64 = 158;
        let ret: i64;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) only asks for permission; it reads and
        // writes no user memory. The syscall clobbers rcx and r11, declared here.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn os_grants_tiles() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_runs_only_where_the_cpu_has_it() {
        use Isa::*;
        // (requested, best) -> runs on
        let table = [
            (None, Amx, Amx),
            (Some(Amx), Avx512, Avx512),
            (Some(Avx512), Amx, Avx512),
            (Some(Avx512), Avx512, Avx512),
            (Some(Avx512), Avx2, Avx2),
            (Some(Avx2), Amx, Avx2),
            (Some(Avx2), Scalar, Scalar),
            (Some(Scalar), Amx, Scalar),
            (Some(Amx), Scalar, Scalar),
            // aarch64: NEON or the portable path; the x86 sets are not there to ask for.
            (None, Neon, Neon),
            (Some(Avx2), Neon, Neon),
            (Some(Avx512), Neon, Neon),
            (Some(Amx), Neon, Neon),
            (Some(Scalar), Neon, Scalar),
            (Some(Neon), Avx512, Avx512),
            (Some(Neon), Scalar, Scalar),
        ];
        for (requested, best, runs) in table {
            assert_eq!(resolve(requested, best), runs, "{requested:?} on {best:?}");
        }
    }

    /// An aarch64 CPU runs the NEON family unless the portable path is asked for.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn aarch64_runs_neon() {
        assert_eq!(Isa::best(), Isa::Neon);
        let want = match requested_by_env() {
            Some(Isa::Scalar) => Isa::Scalar,
            _ => Isa::Neon,
        };
        assert_eq!(Isa::detect(), want);
    }

    #[test]
    fn names_parse_back() {
        for isa in [Isa::Amx, Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("neon?"), None);
    }
}
