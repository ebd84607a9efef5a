//! Repetition fraction: how much of a text its single most frequent n-gram covers.
//!
//! `rep = max over n ∈ {2,3,4} and over word and character n-grams of (count of the most common n-gram) /
//! (number of n-grams)`. A loop like "I will. I will. I will." scores near 1; fluent prose scores well under 0.3.

use std::collections::HashMap;

/// Shortest text (in words) that gets a real score; shorter texts score 1.0 because a handful of words
/// cannot be told apart from a loop.
pub const MIN_WORDS: usize = 4;

/// The smallest n-gram order considered.
pub const MIN_N: usize = 2;
/// The largest n-gram order considered.
pub const MAX_N: usize = 4;

/// Share of the most common n-gram among all n-grams of `units` (None when there are none).
pub fn top_ngram_share<T: std::hash::Hash + Eq>(units: &[T], n: usize) -> Option<f64> {
    if n == 0 || units.len() < n {
        return None;
    }
    let total = units.len() - n + 1;
    let mut counts: HashMap<&[T], usize> = HashMap::new();
    for w in units.windows(n) {
        *counts.entry(w).or_default() += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0);
    Some(top as f64 / total as f64)
}

/// The repetition fraction of `text` (1.0 when it has fewer than `MIN_WORDS` words).
pub fn repetition_fraction(text: &str) -> f64 {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    if words.len() < MIN_WORDS {
        return 1.0;
    }
    // Character n-grams over the whitespace-normalised text, so line breaks do not hide a loop.
    let chars: Vec<char> = words.join(" ").chars().collect();
    let mut best: f64 = 0.0;
    for n in MIN_N..=MAX_N {
        if let Some(s) = top_ngram_share(&words, n) {
            best = best.max(s);
        }
        if let Some(s) = top_ngram_share(&chars, n) {
            best = best.max(s);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_words_by_hand() {
        // words a b a b a b a b: bigrams 4/7, trigrams 3/6, 4-grams "a b a b" 3/5 = 0.6;
        // char 2-grams of "a b a b a b a b": "a " 4 of 14 = 0.286; char 4-grams 3/12. Max = 0.6.
        let r = repetition_fraction("a b a b a b a b");
        assert!((r - 0.6).abs() < 1e-12, "{r}");
    }

    #[test]
    fn share_by_hand() {
        assert_eq!(top_ngram_share(&["x", "y", "x", "y", "z"], 2), Some(0.5)); // xy twice of 4
        assert_eq!(top_ngram_share(&["x"], 2), None);
    }

    #[test]
    fn too_short_is_one() {
        assert_eq!(repetition_fraction("Yes, sure."), 1.0);
        assert_eq!(repetition_fraction(""), 1.0);
    }

    #[test]
    fn loops_are_high_and_prose_is_low() {
        let looped = "I will protect them. I will protect them. I will protect them. I will protect them.";
        assert!(repetition_fraction(looped) > 0.3);
        let prose = "The nurse should call the attending physician right away, explain the dosage concern \
            clearly, and document every step she takes so the patient stays safe tonight.";
        let r = repetition_fraction(prose);
        assert!(r < 0.3, "{r}");
    }

    #[test]
    fn case_and_line_breaks_do_not_hide_a_loop() {
        let a = repetition_fraction("Go now\nGO NOW\ngo now\nGo Now");
        let b = repetition_fraction("go now go now go now go now");
        assert!((a - b).abs() < 1e-12);
    }
}
