//! Healing: LoRA training with a KL barrier, gated bake, PEFT export.
