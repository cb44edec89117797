//! Pure statistics for the benchmark: medians and spread over repeated runs, and ratios to
//! the direct (no mesh) variant measured in the same repetition, so slow phases of a noisy
//! machine hit both sides of a ratio alike.

use serde_json::{json, Value};

/// Which way is good for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Higher => "higher",
            Better::Lower => "lower",
        }
    }
}

/// The median of `v` (mean of the two middle values for an even count); None when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}

/// What the report shows for one variant of one metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max - min) / median, in percent: how much the repetitions disagree.
    pub spread_pct: f64,
    /// Median over repetitions of (this variant / direct in the same repetition).
    pub ratio_to_direct: Option<f64>,
}

/// Summarises `samples` (one per repetition, None where that run failed) against the direct
/// variant's samples of the same repetitions.
pub fn summarise(samples: &[Option<f64>], direct: &[Option<f64>]) -> Option<Summary> {
    let ok: Vec<f64> = samples.iter().flatten().copied().collect();
    let median = median(&ok)?;
    let min = ok.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ok.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ratios: Vec<f64> = samples
        .iter()
        .zip(direct)
        .filter_map(|(s, d)| match (s, d) {
            (Some(s), Some(d)) if *d > 0.0 => Some(s / d),
            _ => None,
        })
        .collect();
    Some(Summary {
        samples: ok,
        median,
        min,
        max,
        spread_pct: if median != 0.0 {
            (max - min) / median.abs() * 100.0
        } else {
            0.0
        },
        ratio_to_direct: self::median(&ratios),
    })
}

impl Summary {
    pub fn to_json(&self) -> Value {
        json!({
            "samples": self.samples,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "spread_pct": self.spread_pct,
            "ratio_to_direct": self.ratio_to_direct,
        })
    }
}

/// Percentile `p` (0..=100) of sorted `v`, nearest-rank.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // The epsilon keeps 99.9% of 1000 at rank 999 despite 0.999 * 1000 = 999.0000000000001.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn ratios_pair_each_repetition_with_its_own_direct_run() {
        // The machine was twice as slow in repetition 2: paired ratios stay at 0.5 while the
        // ratio of medians would not.
        let direct = [Some(10.0), Some(5.0), Some(10.0)];
        let mesh = [Some(5.0), Some(2.5), Some(5.0)];
        let s = summarise(&mesh, &direct).expect("summary");
        assert_eq!(s.median, 5.0);
        assert_eq!((s.min, s.max), (2.5, 5.0));
        assert_eq!(s.ratio_to_direct, Some(0.5));
        assert!((s.spread_pct - 50.0).abs() < 1e-9);
    }

    #[test]
    fn failed_runs_are_left_out() {
        let direct = [Some(10.0), None, Some(8.0)];
        let mesh = [None, Some(7.0), Some(4.0)];
        let s = summarise(&mesh, &direct).expect("summary");
        assert_eq!(s.samples, vec![7.0, 4.0]);
        assert_eq!(s.ratio_to_direct, Some(0.5), "only repetition 3 pairs up");
        assert_eq!(summarise(&[None, None], &direct), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(500.0));
        assert_eq!(percentile(&v, 99.0), Some(990.0));
        assert_eq!(percentile(&v, 99.9), Some(999.0));
        assert_eq!(percentile(&v, 100.0), Some(1000.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
