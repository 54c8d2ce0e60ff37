//! From a cumulative energy series to the report's energy figures: window energy, the idle
//! baseline, dynamic energy per query and per token, their uncertainty, and warning flags.
//!
//! E_dynamic = E_window − P_idle · T_window. Its variance adds the counter's quantization at
//! both window edges (2·q²/12), the idle mean's uncertainty scaled by the window
//! (T² · σ²(P̄_idle), σ from one-second block means), and, when idle was measured before and
//! after, half the drift between the two over the window.

use serde::Serialize;

/// Cumulative energy (J) at times (s since the bench started), in time order.
pub type Series = [(f64, f64)];

/// Linear interpolation of the cumulative energy at `t`; None outside the series.
pub fn energy_at(series: &Series, t: f64) -> Option<f64> {
    let i = series.partition_point(|s| s.0 < t);
    if i < series.len() && (series[i].0 - t).abs() < 1e-9 {
        return Some(series[i].1);
    }
    if i == 0 || i >= series.len() {
        return None;
    }
    let (t0, e0) = series[i - 1];
    let (t1, e1) = series[i];
    Some(e0 + (e1 - e0) * (t - t0) / (t1 - t0))
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IdleStats {
    pub duration_s: f64,
    pub energy_j: f64,
    pub mean_w: f64,
    /// Standard deviation of one-second block means (null with fewer than two blocks).
    pub std_w: Option<f64>,
    /// Number of blocks (or 1 for a manual reading pair).
    pub samples: usize,
}

/// Idle power over [t0, t1] from the series, in one-second blocks.
pub fn idle_stats(series: &Series, t0: f64, t1: f64) -> Option<IdleStats> {
    let e0 = energy_at(series, t0)?;
    let e1 = energy_at(series, t1)?;
    let duration_s = t1 - t0;
    if duration_s <= 0.0 {
        return None;
    }
    let mut blocks = Vec::new();
    let mut t = t0;
    while t + 1.0 <= t1 + 1e-9 {
        if let (Some(a), Some(b)) = (energy_at(series, t), energy_at(series, t + 1.0)) {
            blocks.push(b - a);
        }
        t += 1.0;
    }
    let std_w = (blocks.len() >= 2).then(|| std_dev(&blocks));
    Some(IdleStats { duration_s, energy_j: e1 - e0, mean_w: (e1 - e0) / duration_s, std_w, samples: blocks.len().max(1) })
}

fn std_dev(v: &[f64]) -> f64 {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnergyFigures {
    pub window_s: f64,
    pub window_j: f64,
    pub mean_power_w: f64,
    pub idle_before: Option<IdleStats>,
    pub idle_after: Option<IdleStats>,
    /// The idle power subtracted: the mean of the idle phases measured.
    pub idle_power_w: f64,
    pub idle_equivalent_j: f64,
    pub dynamic_j: f64,
    pub dynamic_j_per_query: Option<f64>,
    pub dynamic_mj_per_generated_token: Option<f64>,
    /// Window energy over generated tokens, nothing subtracted.
    pub total_mj_per_generated_token: Option<f64>,
    /// Half-width of the 95% confidence interval of dynamic_mj_per_generated_token.
    pub ci95_mj_per_generated_token: Option<f64>,
    pub ci95_dynamic_j: f64,
}

/// Inputs to `figures`, kept apart so the arithmetic can be checked by hand.
pub struct WindowEnergy {
    pub window_s: f64,
    pub window_j: f64,
    pub idle_before: Option<IdleStats>,
    pub idle_after: Option<IdleStats>,
    pub resolution_j: f64,
    pub queries: usize,
    pub generated_tokens: usize,
}

pub fn figures(w: WindowEnergy) -> EnergyFigures {
    let idles: Vec<&IdleStats> = [&w.idle_before, &w.idle_after].into_iter().flatten().collect();
    let idle_power_w = if idles.is_empty() { 0.0 } else { idles.iter().map(|i| i.mean_w).sum::<f64>() / idles.len() as f64 };
    let idle_equivalent_j = idle_power_w * w.window_s;
    let dynamic_j = w.window_j - idle_equivalent_j;
    // σ of the idle mean: block std over √blocks, averaged over the phases measured.
    let sigma_idle_mean = if idles.is_empty() {
        0.0
    } else {
        let v: f64 = idles.iter().map(|i| i.std_w.map(|s| s * s / i.samples as f64).unwrap_or(0.0)).sum::<f64>();
        (v / (idles.len() * idles.len()) as f64).sqrt()
    };
    let drift_j = match (&w.idle_before, &w.idle_after) {
        (Some(b), Some(a)) => 0.5 * (b.mean_w - a.mean_w).abs() * w.window_s,
        _ => 0.0,
    };
    // The two idle edges also carry quantization when the idle power comes from readings.
    let q = w.resolution_j;
    let var = 2.0 * q * q / 12.0 + (w.window_s * sigma_idle_mean).powi(2) + drift_j.powi(2);
    let ci95_dynamic_j = 1.96 * var.sqrt();
    let per = |x: f64, n: usize| (n > 0).then(|| x / n as f64);
    EnergyFigures {
        window_s: w.window_s,
        window_j: w.window_j,
        mean_power_w: if w.window_s > 0.0 { w.window_j / w.window_s } else { 0.0 },
        idle_power_w,
        idle_equivalent_j,
        dynamic_j,
        dynamic_j_per_query: per(dynamic_j, w.queries),
        dynamic_mj_per_generated_token: per(dynamic_j * 1e3, w.generated_tokens),
        total_mj_per_generated_token: per(w.window_j * 1e3, w.generated_tokens),
        ci95_mj_per_generated_token: per(ci95_dynamic_j * 1e3, w.generated_tokens),
        ci95_dynamic_j,
        idle_before: w.idle_before,
        idle_after: w.idle_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_between_samples() {
        let s = [(0.0, 0.0), (1.0, 2.0), (3.0, 10.0)];
        assert_eq!(energy_at(&s, 0.5), Some(1.0));
        assert_eq!(energy_at(&s, 2.0), Some(6.0));
        assert_eq!(energy_at(&s, 3.0), Some(10.0));
        assert_eq!(energy_at(&s, 3.5), None);
        assert_eq!(energy_at(&s, -1.0), None);
    }

    #[test]
    fn idle_power_comes_from_block_means() {
        // 2 W for 2 s, then 4 W for 2 s: blocks 2, 2, 4, 4 W.
        let s = [(0.0, 0.0), (1.0, 2.0), (2.0, 4.0), (3.0, 8.0), (4.0, 12.0)];
        let i = idle_stats(&s, 0.0, 4.0).unwrap();
        assert_eq!(i.mean_w, 3.0);
        assert_eq!(i.samples, 4);
        // sample std of [2,2,4,4] = sqrt(4/3)
        assert!((i.std_w.unwrap() - (4.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn baseline_subtraction_matches_hand_computation() {
        // Window: 90 s, 540 J (6 W average). Idle 4 W before, 4.2 W after (mean 4.1 W).
        // Idle equivalent 4.1 * 90 = 369 J; dynamic 171 J; 100 queries, 3000 tokens:
        // 1.71 J/query, 57 mJ/token dynamic, 180 mJ/token total.
        let idle = |w: f64| IdleStats { duration_s: 30.0, energy_j: w * 30.0, mean_w: w, std_w: Some(0.3), samples: 30 };
        let f = figures(WindowEnergy {
            window_s: 90.0,
            window_j: 540.0,
            idle_before: Some(idle(4.0)),
            idle_after: Some(idle(4.2)),
            resolution_j: 3.6,
            queries: 100,
            generated_tokens: 3000,
        });
        assert!((f.idle_power_w - 4.1).abs() < 1e-12);
        assert!((f.idle_equivalent_j - 369.0).abs() < 1e-9);
        assert!((f.dynamic_j - 171.0).abs() < 1e-9);
        assert!((f.dynamic_j_per_query.unwrap() - 1.71).abs() < 1e-12);
        assert!((f.dynamic_mj_per_generated_token.unwrap() - 57.0).abs() < 1e-9);
        assert!((f.total_mj_per_generated_token.unwrap() - 180.0).abs() < 1e-9);
        // σ² = 2·3.6²/12 + (90·σ_mean)² + (0.5·0.2·90)², σ_mean² = (0.09/30 + 0.09/30)/4
        let sigma_mean_sq = (0.09 / 30.0 * 2.0) / 4.0;
        let var = 2.0 * 3.6 * 3.6 / 12.0 + 8100.0 * sigma_mean_sq + 9.0f64.powi(2);
        assert!((f.ci95_dynamic_j - 1.96 * var.sqrt()).abs() < 1e-9);
    }
}
