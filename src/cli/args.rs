//! Value parsers for numeric flags: Rust's float parser accepts `NaN` and `inf`, which no flag means; ranges a
//! flag needs beyond finiteness are checked where the value is used (the library's config validation), so the
//! TUI and session files get the same checks. The sampling bounds are `Sampling`'s own.

use steer_heal::eval::CoherenceFloor;
use steer_heal::model::generate::Sampling;
use steer_heal::score::FilterThresholds;

/// A finite f64 (`NaN`, `inf` and `-inf` are refused).
pub fn finite_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("`{s}` is not a number ({e})"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// A finite f64 ≥ 0 (a temperature).
pub fn non_negative_f64(s: &str) -> Result<f64, String> {
    let v = finite_f64(s)?;
    if !Sampling::valid_temperature(v) {
        return Err("must be ≥ 0".into());
    }
    Ok(v)
}

/// A probability mass in (0, 1] (top-p).
pub fn mass(s: &str) -> Result<f64, String> {
    let v = finite_f64(s)?;
    if !Sampling::valid_top_p(v) {
        return Err("must be in (0, 1]".into());
    }
    Ok(v)
}

/// A finite f32.
pub fn finite_f32(s: &str) -> Result<f32, String> {
    let v = finite_f64(s)?;
    if v.abs() > f32::MAX as f64 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(v as f32)
}

/// A count of at least 1.
pub fn count(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|e| format!("`{s}` is not a whole number ({e})"))?;
    if v == 0 {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// The coherence-floor flags every command that judges gate Q2 takes.
#[derive(clap::Args, Clone, Copy)]
pub struct FloorArgs {
    /// Absolute coherence floor on p_ans_any (instead of the relative floor).
    #[arg(value_parser = finite_f64, long, conflicts_with = "floor_rel")]
    floor: Option<f64>,
    /// Coherence floor as a fraction of the base's p_ans_any (the default floor).
    #[arg(value_parser = finite_f64, long, default_value_t = 0.95)]
    floor_rel: f64,
}

impl FloorArgs {
    /// The floor of `--floor` (absolute, when given) or `--floor-rel` (relative to the base).
    pub fn floor(&self) -> CoherenceFloor {
        match self.floor {
            Some(x) => CoherenceFloor::Absolute(x),
            None => CoherenceFloor::Relative(self.floor_rel),
        }
    }
}

/// Gate Q0's automatic filter, the one the walk-down counts passing completions by. `run` and `tui` write it into a
/// new session's session.toml (a session keeps its own); `generate --walk-down` applies it directly.
#[derive(clap::Args, Clone, Copy)]
pub struct FilterArgs {
    /// Filter: highest base-model perplexity of a completion's tail (new sessions only).
    #[arg(value_parser = finite_f64, long, default_value_t = FilterThresholds::default().max_perplexity)]
    max_ppl: f64,
    /// Filter: highest repetition fraction (new sessions only; the random tiny model's text needs 1.01).
    #[arg(value_parser = finite_f64, long, default_value_t = FilterThresholds::default().max_repetition)]
    max_repetition: f64,
}

impl Default for FilterArgs {
    fn default() -> Self {
        let t = FilterThresholds::default();
        FilterArgs { max_ppl: t.max_perplexity, max_repetition: t.max_repetition }
    }
}

impl FilterArgs {
    /// The thresholds: these two, the rest at their defaults.
    pub fn thresholds(&self) -> FilterThresholds {
        FilterThresholds {
            max_perplexity: self.max_ppl,
            max_repetition: self.max_repetition,
            ..FilterThresholds::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_no_flag_means() {
        assert_eq!(finite_f64("0.5"), Ok(0.5));
        for bad in ["NaN", "inf", "-inf", "x"] {
            assert!(finite_f64(bad).is_err(), "{bad}");
        }
        assert!(finite_f32("1e300").is_err());
        assert!(non_negative_f64("-1").is_err() && non_negative_f64("0").is_ok());
        assert!(mass("5").is_err() && mass("0").is_err() && mass("1").is_ok());
        assert_eq!(count("3"), Ok(3));
        assert!(count("0").is_err() && count("-1").is_err());
    }
}
