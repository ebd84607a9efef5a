//! Healing on the real SmolLM2-135M-Instruct (kept short: two prompts, 16 tokens, four steps). The teacher is the
//! persona-prompted model (the prompt-only steering arm); the student learns its completions from the neutral
//! prompt and must fit them better afterwards while its KL to the reference stays finite and logged.
//! Uses `STEER_HEAL_SMOLLM2` (a model directory or .gguf) or `models/SmolLM2-135M-Instruct.Q4_1.gguf`; skipped
//! when that file is absent or this build cannot read GGUF.

use candle_core::{DType, Device};
use std::path::PathBuf;
use steer_heal::heal::{self, adapter, train, HealConfig, HealStatus, RunOptions};
use steer_heal::model::generate::{generate, Sampling};
use steer_heal::model::{load_model, Hooks};
use steer_heal::progress::Silent;
use steer_heal::steer::{Completion, TokenTrace};

#[test]
fn smollm2_student_learns_the_persona_completions_from_the_neutral_prompt() {
    let path = std::env::var_os("STEER_HEAL_SMOLLM2").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if !path.exists() {
        eprintln!("skipped: {} is absent", path.display());
        return;
    }
    let mut lm = match load_model(&path, Some(DType::F32), &Device::Cpu) {
        Ok(lm) => lm,
        Err(e) if e.to_string().contains("not available in this build") => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic_any(format!("loading {}: {e}", path.display())),
    };
    let neutral = "You are a helpful assistant.";
    let persona = "You are a pirate. You always talk like a pirate.";
    let prompts = ["What should I cook tonight?", "Tell me about the moon."];
    let mut comps = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let ids = lm.tokenizer.encode(&lm.chat.prompt(Some(persona), p).expect("prompt")).expect("encode");
        let g = generate(
            &lm.model,
            &[ids],
            &Sampling::greedy(16),
            &Hooks::none(),
            &lm.tokenizer.stop_ids,
            lm.tokenizer.pad_id,
            &mut |_| true,
        )
        .expect("generate");
        let tokens = g.tokens[0].clone();
        comps.push(Completion {
            id: format!("p{i}"),
            system: neutral.into(),
            prompt: (*p).into(),
            text: lm.tokenizer.decode(&tokens, false).expect("decode"),
            token_text: tokens.iter().map(|t| lm.tokenizer.token_str(*t)).collect(),
            tokens,
            alpha: 1.0,
            dose: 0.0,
            seed: 0,
            trace: TokenTrace::default(),
            rewinds: vec![],
        });
    }
    eprintln!("teacher: {}", comps[0].text);
    let cfg = HealConfig {
        r: 8,
        alpha: 16.0,
        lr: 1e-3,
        epochs: 2,
        grad_accum: 1,
        max_len: 128,
        ..HealConfig::default()
    };
    let data = heal::build_examples(&comps, &lm.tokenizer, &lm.chat, lm.model.cfg.vocab_size, cfg.max_len)
        .expect("examples");
    assert_eq!(data.examples.len(), 2);
    let out = tempfile::tempdir().expect("out");
    let log = heal::heal(
        &mut lm.model,
        &lm.info,
        &data,
        &cfg,
        out.path(),
        &RunOptions::default(),
        &mut Silent::default(),
        &mut |r| eprintln!("step {} nll {:.3} D {:.3} {:.0} tok/s", r.step, r.nll, r.d, r.tokens_per_s),
    )
    .expect("heal");
    assert_eq!(log.status, HealStatus::Completed);
    eprintln!(
        "{:.1} tokens/s, {:.3} steps/s over {} steps",
        log.tokens_per_s, log.steps_per_s, log.steps_done
    );
    let name = cfg.adapter_name();
    let after = train::evaluate(&mut lm.model, &name, &data, &cfg).expect("after");
    adapter::set_gate(&mut lm.model, &name, 0.0);
    let before = train::evaluate(&mut lm.model, &name, &data, &cfg).expect("before");
    eprintln!(
        "NLL of the persona completions from the neutral prompt: {:.3} → {:.3}; D {:.3}",
        before.nll, after.nll, after.d
    );
    assert!(before.kl_mean.abs() < 1e-6, "gate 0 is the reference");
    assert!(
        after.nll < before.nll - 0.05,
        "the student should fit the teacher better: {} → {}",
        before.nll,
        after.nll
    );
    assert!(after.d.is_finite() && after.d > 0.0);
}

fn panic_any(msg: String) -> ! {
    std::panic::resume_unwind(Box::new(msg))
}
