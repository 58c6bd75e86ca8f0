//! A branch-free `erf` for the hand-written backward's GELU in f32.
//!
//! `libm::erff` (what candle's `erf_f32` calls) branches on the argument's range and calls
//! `expf` inside, so a loop of it does not vectorise, and GELU evaluates one per hidden
//! activation per pass (1.6 million per pass of the tiny ViT at batch 8). [`erf`] is a rational
//! function in straight-line arithmetic that the compiler runs in SIMD lanes. Measured
//! 2026-12-05 on 3.2 million arguments in [-4, 4] (scratch program, release, quiet machine):
//! `libm::erff` 15-16 ns per element, [`erf`] 2.7 ns (1.2 ns evaluated in f32, which is too
//! noisy: see its doc).
//!
//! The f64 kernels keep the C library's `erf`, so the f64 checks of the backward against
//! candle's autograd stay exact.

/// Above this argument `erf` rounds to 1 in f32 (erf(3.92) = 1 - 3.0e-8, half an ulp below 1).
const ERF_SATURATION: f64 = 3.92;

/// Numerator coefficients of erf(x) ~ x N(x^2) / D(x^2) on [0, 3.92], lowest power first.
/// Fitted for fedleak (2026-12-05) by weighted least squares on a dense grid against scipy's
/// `erf`, reweighted towards the minimax error (Loeb, then Lawson): 1.4e-9 largest error in f64
/// arithmetic.
const ERF_NUMERATOR: [f64; 7] = [
    1.128_379_181,
    1.847_003_240e-1,
    5.427_849_155e-2,
    3.832_377_400e-3,
    3.803_819_700e-4,
    4.718_113_600e-6,
    -1.333_754_194e-8,
];

/// Denominator coefficients of the same fit, from the first power up (the constant term is 1).
const ERF_DENOMINATOR: [f64; 5] = [
    4.970_199_289e-1,
    1.137_754_636e-1,
    1.543_098_156e-2,
    1.305_043_073e-3,
    6.342_194_635e-5,
];

/// The error function in f32: the fitted rational evaluated in f64 and rounded, within 3.2e-8 of
/// the exact value (at most half a unit in the last place near 1, plus the fit's 1.4e-9), odd,
/// never beyond +-1, and exactly +-1 beyond +-3.92. NaN stays NaN. (Evaluated in f32 the same
/// rational is off by up to 4.8e-7, 8 units in the last place, and that rounding noise, divided by
/// the finite-difference step of the attack's Hessian-vector product, moved its objective 16 times
/// further from the exact double backward's: 1.25e-4 against 7.7e-6 relative after four steps in
/// `tests/cli_attack.rs`.)
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let x = f64::from(x).clamp(-ERF_SATURATION, ERF_SATURATION);
    let t = x * x;
    let [n0, n1, n2, n3, n4, n5, n6] = ERF_NUMERATOR;
    let [d1, d2, d3, d4, d5] = ERF_DENOMINATOR;
    let numerator = (((((n6 * t + n5) * t + n4) * t + n3) * t + n2) * t + n1) * t + n0;
    let denominator = ((((d5 * t + d4) * t + d3) * t + d2) * t + d1) * t + 1.0;
    (x * numerator / denominator).clamp(-1.0, 1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 997th f32 bit pattern between `low` and `high` (both positive), and the two ends.
    fn sample(low: f32, high: f32) -> impl Iterator<Item = f32> {
        (low.to_bits()..=high.to_bits())
            .step_by(997)
            .chain([high.to_bits()])
            .map(f32::from_bits)
    }

    #[test]
    fn erf_is_within_its_stated_error_of_the_f64_erf() {
        let mut worst_absolute = 0f64;
        let mut worst_relative = 0f64;
        for x in sample(1e-30, 6.0) {
            for x in [x, -x] {
                let exact = candle_core::cpu::erf::erf_f64(f64::from(x));
                let error = (f64::from(erf(x)) - exact).abs();
                worst_absolute = worst_absolute.max(error);
                worst_relative = worst_relative.max(error / exact.abs());
            }
        }
        assert!(worst_absolute < 3.2e-8, "largest error {worst_absolute:e}");
        assert!(
            worst_relative < 1.2e-7,
            "largest relative error {worst_relative:e}"
        );
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(4.0), 1.0);
        assert_eq!(erf(-f32::INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }
}
