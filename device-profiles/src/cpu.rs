//! The CPU features a build was compiled to use, checked against the processor it runs on.
//!
//! The aarch64 builds for the boards enable `fp16` and `dotprod` (see `.cargo/config.toml` and
//! README.md "ARM boards"). Such a binary on a Cortex-A72 (Raspberry Pi 4) would die with SIGILL
//! at its first half-precision or SDOT instruction; [`exit_unless_supported`], called first
//! thing in `main` by `tmod` and `tmoctl`, turns that into a message naming the missing
//! features and exit status [`EXIT_UNSUPPORTED_CPU`].

/// Exit status of a binary started on a processor that lacks a compiled-in feature
/// (EX_UNAVAILABLE from sysexits.h).
pub const EXIT_UNSUPPORTED_CPU: i32 = 69;

/// The target features this binary was compiled with that the running processor lacks, by
/// their Rust names (`fp16`, `dotprod`, ...). Empty when the processor can run it.
///
/// `std::arch::is_aarch64_feature_detected!` cannot answer this: it returns true without
/// asking the processor for a feature the build enables. The answer comes from the kernel's
/// hardware capability bits instead (`AT_HWCAP`, `AT_HWCAP2`), read with rustix. Only aarch64
/// is checked: the x86-64 and 32-bit ARM builds enable nothing beyond their baseline.
pub fn missing_compiled_features() -> Vec<&'static str> {
    #[cfg(all(target_os = "linux", target_arch = "aarch64"))]
    {
        let (hwcap, hwcap2) = rustix::param::linux_hwcap();
        aarch64::missing(hwcap as u64, hwcap2 as u64)
    }
    #[cfg(not(all(target_os = "linux", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

/// aarch64 target features and the Linux hardware capability bits that announce them
/// (`arch/arm64/include/uapi/asm/hwcap.h`; the same mapping as std's run-time detection).
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
mod aarch64 {
    const HWCAP_AES: u64 = 1 << 3;
    const HWCAP_PMULL: u64 = 1 << 4;
    const HWCAP_SHA1: u64 = 1 << 5;
    const HWCAP_SHA2: u64 = 1 << 6;
    const HWCAP_CRC32: u64 = 1 << 7;
    const HWCAP_ATOMICS: u64 = 1 << 8;
    const HWCAP_FPHP: u64 = 1 << 9;
    const HWCAP_ASIMDHP: u64 = 1 << 10;
    const HWCAP_ASIMDRDM: u64 = 1 << 12;
    const HWCAP_LRCPC: u64 = 1 << 15;
    const HWCAP_SHA3: u64 = 1 << 17;
    const HWCAP_ASIMDDP: u64 = 1 << 20;
    const HWCAP_SHA512: u64 = 1 << 21;
    const HWCAP_SVE: u64 = 1 << 22;
    const HWCAP_ASIMDFHM: u64 = 1 << 23;
    const HWCAP2_SVE2: u64 = 1 << 1;
    const HWCAP2_I8MM: u64 = 1 << 13;
    const HWCAP2_BF16: u64 = 1 << 14;

    /// A target feature, whether this build enables it, and the bits of `AT_HWCAP` and
    /// `AT_HWCAP2` that must all be set for it.
    pub(super) const FEATURES: &[(&str, bool, u64, u64)] = &[
        ("fp16", cfg!(target_feature = "fp16"), HWCAP_FPHP | HWCAP_ASIMDHP, 0),
        ("dotprod", cfg!(target_feature = "dotprod"), HWCAP_ASIMDDP, 0),
        ("i8mm", cfg!(target_feature = "i8mm"), 0, HWCAP2_I8MM),
        ("bf16", cfg!(target_feature = "bf16"), 0, HWCAP2_BF16),
        ("lse", cfg!(target_feature = "lse"), HWCAP_ATOMICS, 0),
        ("rcpc", cfg!(target_feature = "rcpc"), HWCAP_LRCPC, 0),
        ("rdm", cfg!(target_feature = "rdm"), HWCAP_ASIMDRDM, 0),
        ("fhm", cfg!(target_feature = "fhm"), HWCAP_ASIMDFHM, 0),
        ("crc", cfg!(target_feature = "crc"), HWCAP_CRC32, 0),
        ("aes", cfg!(target_feature = "aes"), HWCAP_AES | HWCAP_PMULL, 0),
        ("sha2", cfg!(target_feature = "sha2"), HWCAP_SHA1 | HWCAP_SHA2, 0),
        ("sha3", cfg!(target_feature = "sha3"), HWCAP_SHA3 | HWCAP_SHA512, 0),
        ("sve", cfg!(target_feature = "sve"), HWCAP_SVE, 0),
        ("sve2", cfg!(target_feature = "sve2"), 0, HWCAP2_SVE2),
    ];

    /// The features this build enables whose bits are not all set in `hwcap`/`hwcap2`.
    pub(super) fn missing(hwcap: u64, hwcap2: u64) -> Vec<&'static str> {
        FEATURES
            .iter()
            .filter(|&&(_, compiled, bits, bits2)| {
                compiled && (hwcap & bits != bits || hwcap2 & bits2 != bits2)
            })
            .map(|&(name, ..)| name)
            .collect()
    }

    /// Which of `names` a processor with these capability bits has (all features, compiled
    /// in or not): for the tests.
    #[cfg(test)]
    pub(super) fn present(hwcap: u64, hwcap2: u64) -> Vec<&'static str> {
        FEATURES
            .iter()
            .filter(|&&(_, _, bits, bits2)| hwcap & bits == bits && hwcap2 & bits2 == bits2)
            .map(|&(name, ..)| name)
            .collect()
    }
}

/// The message for a processor that lacks `missing` features, naming them and what to do.
pub fn unsupported_cpu_message(program: &str, missing: &[&str]) -> String {
    format!(
        "{program}: this build uses CPU features this processor does not have: {}. It was \
         compiled for {} with target features beyond the baseline (the ARM board builds assume \
         ARMv8.2-A with fp16 and dotprod: Raspberry Pi 5, Jetson Orin Nano, RK3588). Install \
         the build for this board (README.md, \"ARM boards\"); refusing to start instead of dying \
         with an illegal instruction.",
        missing.join(", "),
        std::env::consts::ARCH,
    )
}

/// Returns when the processor has every feature this binary was compiled with; otherwise
/// prints [`unsupported_cpu_message`] to stderr and exits with [`EXIT_UNSUPPORTED_CPU`].
/// Call it first in `main`, before anything that could run the compiled-in instructions.
pub fn exit_unless_supported(program: &str) {
    let missing = missing_compiled_features();
    if !missing.is_empty() {
        eprintln!("{}", unsupported_cpu_message(program, &missing));
        std::process::exit(EXIT_UNSUPPORTED_CPU);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_processor_running_the_tests_has_every_compiled_feature() {
        // The test binary is compiled with the same target features as tmod: if this fails,
        // the test itself could not have run its compiled-in instructions either.
        assert_eq!(missing_compiled_features(), Vec::<&str>::new());
    }

    #[test]
    fn capability_bits_map_to_features() {
        // A Cortex-A72 as qemu 7.2 reports it (fp asimd aes pmull sha1 sha2 crc32 cpuid): no
        // fp16, no dotprod.
        assert_eq!(aarch64::present(0x8fb, 0), ["crc", "aes", "sha2"]);
        // A Cortex-A76: adds atomics, fphp, asimdhp, asimdrdm, lrcpc, asimddp.
        let a76 = 0x8fb | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 12 | 1 << 15 | 1 << 20;
        assert_eq!(aarch64::present(a76, 0), ["fp16", "dotprod", "lse", "rcpc", "rdm", "crc", "aes", "sha2"]);
        // fp16 needs both the scalar and the vector half-precision bits.
        assert!(!aarch64::present(1 << 9, 0).contains(&"fp16"));
        assert_eq!(aarch64::present(0, 1 << 13 | 1 << 14), ["i8mm", "bf16"]);
    }

    #[test]
    fn a_processor_without_a_compiled_feature_is_reported() {
        let compiled: Vec<&str> = aarch64::FEATURES.iter().filter(|f| f.1).map(|f| f.0).collect();
        // Nothing set: every feature this build enables (on aarch64: fp16 and dotprod) is
        // missing; everything set: none is.
        assert_eq!(aarch64::missing(0, 0), compiled);
        assert_eq!(aarch64::missing(u64::MAX, u64::MAX), Vec::<&str>::new());
        if cfg!(target_arch = "aarch64") {
            assert!(compiled.contains(&"fp16") && compiled.contains(&"dotprod"), "{compiled:?}");
        }
    }

    #[test]
    fn the_message_names_the_program_and_each_missing_feature() {
        let message = unsupported_cpu_message("tmod", &["fp16", "dotprod"]);
        assert!(message.starts_with("tmod: "), "{message}");
        assert!(message.contains("fp16, dotprod"), "{message}");
        assert!(message.contains(std::env::consts::ARCH), "{message}");
    }
}
