//! tinymfv evaluation and coherence metrics.
