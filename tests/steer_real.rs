//! Steering on the real SmolLM2-135M-Instruct (Q4_1 GGUF): the authority vector from a few pairs, a quick
//! iso-KL dose on short rollouts, a visible change of the greedy completion at c*, and replay at dose 0 that
//! continues exactly as the base model. Kept short: a handful of tokens per step.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (`cargo run -- fetch-model smollm2`); set
//! `STEER_HEAL_SKIP_REAL=1` to skip on a machine without it.

use candle_core::{DType, Device};
use std::path::PathBuf;
use steer_heal::model::generate::{generate, Sampling};
use steer_heal::model::{load_model, Hooks, LoadedModel};
use steer_heal::progress::Silent;
use steer_heal::steer::dose::{calibrate, DoseConfig, SolverConfig};
use steer_heal::steer::extract::{extract_mean_diff, ExtractConfig};
use steer_heal::steer::generate::{generate_completions, replay, requests_for, GenConfig};
use steer_heal::steer::{Persona, Statistic, Steering};

fn smollm2() -> Option<LoadedModel> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let skip = std::env::var("STEER_HEAL_SKIP_REAL").as_deref() == Ok("1");
    assert!(
        p.exists() || skip,
        "{} is absent: run `cargo run -- fetch-model smollm2` (or set STEER_HEAL_SKIP_REAL=1 to skip real-model tests)",
        p.display()
    );
    if !p.exists() {
        eprintln!("skipping: {} is absent and STEER_HEAL_SKIP_REAL=1", p.display());
        return None;
    }
    Some(load_model(&p, Some(DType::F32), &Device::Cpu).expect("load SmolLM2 GGUF"))
}

#[test]
fn authority_vector_doses_steers_and_replays_on_smollm2() {
    let Some(lm) = smollm2() else { return };
    let persona = Persona::default_authority().expect("persona");
    let cfg = ExtractConfig { n_pairs: Some(4), ..ExtractConfig::for_model(&lm) };
    assert_eq!(cfg.layers, vec![13, 14, 15], "0.45–0.55 band of 30 blocks");
    let v = extract_mean_diff(&lm, &persona, &cfg, &mut Silent::default()).expect("extract");
    assert!(v.meta.norms.iter().all(|n| n.is_finite() && *n > 0.0), "norms {:?}", v.meta.norms);
    let s = Steering::new(&v, &lm.model).expect("steering");

    let dose = DoseConfig {
        solver: SolverConfig::default(),
        statistic: Statistic::P95,
        tokens: 8,
        // One prompt keeps the rollout on the fast single-row path; p95 then reads the tail of 8 positions.
        prompts: persona.spec.calibration_prompts[..1].to_vec(),
        system: persona.spec.neutral_system.clone(),
    };
    let r = calibrate(&lm, &s, &dose, &mut Silent::default()).expect("dose");
    assert!(r.converged, "iso-KL did not converge: {r:?}");
    assert!((r.achieved - 1.0).abs() < 0.05, "p95 at c* = {}", r.achieved);

    let mut gen = GenConfig::new(12);
    gen.sampling.temperature = 0.0;
    let reqs = requests_for(&persona.spec.prompts[..1], &[1.0], 0);
    let c = generate_completions(
        &lm,
        &s,
        &persona.spec.neutral_system,
        r.c_star,
        &reqs,
        &gen,
        &mut Silent::default(),
    )
    .expect("steered")
    .remove(0);
    let prompt = lm
        .tokenizer
        .encode(&lm.chat.prompt(Some(&persona.spec.neutral_system), &c.prompt).expect("chat"))
        .expect("ids");
    let greedy = |ctx: Vec<u32>, n: usize| {
        generate(
            &lm.model,
            &[ctx],
            &Sampling::greedy(n),
            &Hooks::none(),
            &lm.tokenizer.stop_ids,
            lm.tokenizer.pad_id,
            &mut |_| true,
        )
        .expect("base")
        .tokens
        .remove(0)
    };
    let base = greedy(prompt.clone(), 12);
    eprintln!(
        "c* = {:.3}\nbase:    {:?}\nsteered: {:?}",
        r.c_star,
        lm.tokenizer.decode(&base, false),
        c.text
    );
    assert_ne!(c.tokens, base, "the authority vector at c* should change the greedy completion");

    let t = 3.min(c.tokens.len());
    let re = replay(&lm, &s, r.c_star, &c, t, 0.0, &gen, &mut Silent::default()).expect("replay");
    let want = greedy([prompt.as_slice(), &c.tokens[..t]].concat(), 12 - t);
    assert_eq!(re.tokens[..t], c.tokens[..t]);
    assert_eq!(re.tokens[t..], want[..], "replay at dose 0 must continue as the base model");
}
