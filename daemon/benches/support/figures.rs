//! What the daemon's bench binaries share: their arguments and how they print a distribution.
#![allow(dead_code)]

/// The value at quantile `p` of `sorted` (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Prints the median, p90 and p99 of `values` (milliseconds) under `name`; returns the median.
pub fn summary(name: &str, mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let median = percentile(&values, 0.5);
    println!(
        "{name:<44} median {median:>8.3} ms   p90 {:>8.3} ms   p99 {:>8.3} ms   (n = {})",
        percentile(&values, 0.9),
        percentile(&values, 0.99),
        values.len()
    );
    median
}

/// The number after `name` on the command line, else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
