//! Which instruction sets the engine's own kernels may use: all this CPU has, or up to a level
//! forced with `MULMD_KERNELS`, so every kernel path can be measured on one machine. An
//! AVX-512 machine then runs the AVX2 path that users' AVX2-only machines run, against a
//! llama.cpp built for AVX2 (`bench/compare_runtimes.py --kernels avx2`).
//!
//! Levels, lowest first. x86-64: `portable` (plain Rust, the compiler's SSE2), `avx2` (AVX2 +
//! FMA), `avx-vnni` (adds `vpdpbusd` in its VEX form), `avx512` (AVX-512 F/BW/VL/VNNI).
//! aarch64: `portable`, `neon` (baseline on every aarch64 core), `dotprod` (`sdot`). A kernel
//! of a level runs only where the CPU has its instructions, as without the switch; the switch
//! only caps. Forcing a level this CPU lacks is an error, never a silent fallback. tract's
//! own kernels (the ops the engine does not replace) keep their own choice.

use std::sync::OnceLock;

/// The environment variable that caps the level: `auto` (or unset) for all this CPU has.
pub const ENV: &str = "MULMD_KERNELS";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Avx2,
    AvxVnni,
    Avx512,
    Neon,
    Dotprod,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avx-vnni",
            Level::Avx512 => "avx512",
            Level::Neon => "neon",
            Level::Dotprod => "dotprod",
        }
    }

    /// This architecture's levels, lowest first.
    fn of_this_arch() -> &'static [Level] {
        if cfg!(target_arch = "x86_64") {
            &[Level::Portable, Level::Avx2, Level::AvxVnni, Level::Avx512]
        } else if cfg!(target_arch = "aarch64") {
            &[Level::Portable, Level::Neon, Level::Dotprod]
        } else {
            &[Level::Portable]
        }
    }

    /// Whether this CPU has every instruction the level's kernels use.
    pub fn on_this_cpu(self) -> bool {
        match self {
            Level::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Level::AvxVnni => Level::Avx2.on_this_cpu() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                Level::Avx2.on_this_cpu()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "aarch64")]
            Level::Neon => true,
            #[cfg(target_arch = "aarch64")]
            Level::Dotprod => std::arch::is_aarch64_feature_detected!("dotprod"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

/// The cap in force: `None` for all this CPU has.
fn cap() -> Option<Level> {
    static CAP: OnceLock<Option<Level>> = OnceLock::new();
    *CAP.get_or_init(|| configured().unwrap_or(None))
}

/// What `MULMD_KERNELS` asks for, checked: `Ok(None)` for auto; an error naming the levels
/// this machine offers when the name is unknown or the CPU lacks the level.
pub fn configured() -> Result<Option<Level>, String> {
    let value = std::env::var(ENV).unwrap_or_default();
    let value = value.trim();
    if value.is_empty() || value == "auto" {
        return Ok(None);
    }
    let levels = Level::of_this_arch();
    let here: Vec<&str> = levels.iter().filter(|l| l.on_this_cpu()).map(|l| l.name()).collect();
    let Some(level) = levels.iter().copied().find(|l| l.name() == value) else {
        return Err(format!("{ENV}={value} is not a kernel level of this architecture; this CPU offers auto, {}", here.join(", ")));
    };
    if !level.on_this_cpu() {
        return Err(format!("{ENV}={value}: this CPU lacks the instructions of that level; it offers auto, {}", here.join(", ")));
    }
    Ok(Some(level))
}

/// Whether kernels of `level` may run (the CPU must still be checked for the instructions a
/// kernel needs; this only applies the cap).
pub fn allows(level: Level) -> bool {
    cap().is_none_or(|c| level <= c)
}

/// The highest level in use: the cap, or the best this CPU has. For reports.
pub fn in_use() -> Level {
    cap().unwrap_or_else(|| Level::of_this_arch().iter().copied().rev().find(|l| l.on_this_cpu()).unwrap_or(Level::Portable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_named_ordered_and_checked() {
        let levels = Level::of_this_arch();
        assert_eq!(levels[0], Level::Portable);
        assert!(levels.windows(2).all(|w| w[0] < w[1]));
        assert!(Level::Portable.on_this_cpu());
        assert!(in_use().on_this_cpu());
        assert!(allows(Level::Portable));
    }
}
