//! Which x86 instruction set the CPU kernels run with: the one owner of that choice.
//!
//! Nothing is compiled for a particular CPU (no `-C target-cpu`): every SIMD kernel is chosen at run time from what
//! the CPU reports, capped by the environment variable `STEER_HEAL_ISA` so that an AVX-512 machine can measure and
//! test the AVX2 path it will meet elsewhere (bench/PROFILE.md, CI runs the tests capped to AVX2). The cap covers
//! our kernels and the matrix multiplier candle calls (the vendored `gemm-common` reads the same variable; see
//! `vendor/README.md`); `check_gemm_agrees` verifies that both read it alike.

use std::sync::OnceLock;

/// The environment variable that caps the instruction set.
pub const ENV: &str = "STEER_HEAL_ISA";

/// An x86-64 instruction-set level, in increasing order of width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable code (SSE2, what every x86-64 has).
    Baseline,
    /// AVX2 with FMA (x86-64-v3): 8 f32 lanes.
    Avx2,
    /// AVX-512 F (x86-64-v4): 16 f32 lanes.
    Avx512,
}

impl Isa {
    /// The name `STEER_HEAL_ISA` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Baseline => "baseline",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parse a value of `STEER_HEAL_ISA`; `auto` (or empty) means no cap.
    pub fn parse_cap(s: &str) -> Result<Option<Isa>, String> {
        match s.trim() {
            "" | "auto" => Ok(None),
            "baseline" | "x86-64" | "x86-64-v1" | "scalar" => Ok(Some(Isa::Baseline)),
            "avx2" | "x86-64-v3" => Ok(Some(Isa::Avx2)),
            "avx512" | "x86-64-v4" => Ok(Some(Isa::Avx512)),
            other => Err(format!("{ENV}={other}: expected one of auto, avx512, avx2, baseline")),
        }
    }

    /// gemm-common's numbering of the same levels.
    fn gemm_level(self) -> u8 {
        match self {
            Isa::Baseline => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest level this CPU supports (gemm's test: `avx512f` for its AVX-512 kernels, `fma` for AVX2; our AVX2
/// kernels need both `avx2` and `fma`).
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Baseline
}

/// The cap from `STEER_HEAL_ISA` (`None`: unset or `auto`).
pub fn cap() -> Result<Option<Isa>, String> {
    match std::env::var(ENV) {
        Ok(v) => Isa::parse_cap(&v),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ENV} is not valid UTF-8")),
    }
}

/// The level the kernels run with: what the CPU has, capped. Read once; an invalid cap counts as none here
/// (the binary refuses one at start-up, through `check`, before any kernel runs).
pub fn active() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let d = detected();
        match cap() {
            Ok(Some(c)) => d.min(c),
            _ => d,
        }
    })
}

/// Validate the cap and that the vendored gemm reads it as we do; returns the active level.
pub fn check() -> Result<Isa, String> {
    cap()?;
    check_gemm_agrees()?;
    Ok(active())
}

/// gemm-common caps its own dispatch from the same variable; this fails if its reading differs from ours.
pub fn check_gemm_agrees() -> Result<(), String> {
    let ours = cap()?.map(Isa::gemm_level).unwrap_or(2);
    let gemm = gemm_common::isa_cap::level();
    if ours == gemm {
        Ok(())
    } else {
        Err(format!(
            "{ENV}: gemm reads level {gemm}, steer-heal reads {ours} (vendor/gemm-common is out of step)"
        ))
    }
}

/// Whether the CPU reports Intel as its vendor (`cpuid` leaf 0: "GenuineIntel"). `steer-heal fetch-blas` fetches
/// MKL beside OpenBLAS only there: MKL is measured faster than OpenBLAS on an Intel Xeon (bench/PROFILE.md, tenth
/// pass) and was never measured on another vendor's CPU.
pub fn vendor_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `cpuid` leaf 0 exists on every x86-64 CPU (the intrinsic is safe from Rust 1.87, unsafe before).
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The CPU features a benchmark report records next to its numbers.
pub fn cpu_features() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_x86_feature_detected!($f) { out.push($f); } )* };
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512bf16"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_and_order() {
        assert_eq!(Isa::parse_cap("auto"), Ok(None));
        assert_eq!(Isa::parse_cap(" avx2 "), Ok(Some(Isa::Avx2)));
        assert_eq!(Isa::parse_cap("x86-64-v4"), Ok(Some(Isa::Avx512)));
        assert_eq!(Isa::parse_cap("baseline"), Ok(Some(Isa::Baseline)));
        let err = Isa::parse_cap("avx3").expect_err("unknown level");
        assert!(err.contains("STEER_HEAL_ISA=avx3"), "{err}");
        assert!(Isa::Baseline < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
    }

    #[test]
    fn the_active_level_never_exceeds_the_cpu_or_the_cap() {
        assert!(active() <= detected());
        if let Ok(Some(c)) = cap() {
            assert!(active() <= c);
        }
        check_gemm_agrees().expect("gemm agrees");
    }
}
