//! Gate-Q0 automatic scores: coherence, repetition, narration, refusal, persona strength.
