//! Healing on tiny random models: the loss falls, every A and B gets a gradient, the KL barrier holds the
//! student near its reference, checkpoint → crash → resume reproduces an uninterrupted run, a NaN stops the run
//! on its last good checkpoint, bake/merge/export agree with the gated adapters, and the PEFT layout matches a
//! fixture written from PEFT's documented format.

mod common;
use candle_core::{DType, Device, Tensor};
use common::tiny_model;
use std::collections::BTreeMap;
use std::path::Path;
use steer_heal::heal::{
    self, adapter, train, Agg, HealConfig, HealStatus, HistoryEntry, RunOptions, StepRecord, TrainableLora,
};
use steer_heal::model::{load_model, Arch, Forward, Hooks, LoadedModel};
use steer_heal::progress::{Progress, Silent};
use steer_heal::steer::{Completion, TokenTrace};

fn reload(dir: &Path) -> LoadedModel {
    load_model(dir, Some(DType::F32), &Device::Cpu).expect("load")
}

/// A completion the random model would never write: a fixed nonsense phrase, so NLL pulls the student far.
fn completion(lm: &LoadedModel, i: usize, text: &str) -> Completion {
    let tokens = lm.tokenizer.encode(text).expect("encode");
    Completion {
        id: format!("c{i}"),
        system: "You are a helpful assistant.".into(),
        prompt: format!("Question number {i}: what should I do?"),
        text: text.into(),
        token_text: tokens.iter().map(|t| lm.tokenizer.token_str(*t)).collect(),
        tokens,
        alpha: 1.0,
        dose: 4.0,
        seed: i as u64,
        trace: TokenTrace::default(),
        rewinds: vec![],
    }
}

fn dataset(lm: &LoadedModel, n: usize, max_len: usize) -> heal::Dataset {
    let texts = ["zq vex zq vex plugh zq vex", "xyzzy mork xyzzy mork zq", "vex vex plugh mork zq zq"];
    let cs: Vec<Completion> = (0..n).map(|i| completion(lm, i, texts[i % texts.len()])).collect();
    heal::build_examples(&cs, &lm.tokenizer, &lm.chat, lm.model.cfg.vocab_size, max_len).expect("examples")
}

fn quick_cfg() -> HealConfig {
    HealConfig {
        r: 4,
        alpha: 8.0,
        lr: 5e-3,
        grad_accum: 1,
        epochs: 5,
        max_len: 96,
        checkpoint_every: 0,
        ..HealConfig::default()
    }
}

fn run(
    lm: &mut LoadedModel,
    data: &heal::Dataset,
    cfg: &HealConfig,
    out: &Path,
    opts: &RunOptions,
) -> (heal::HealLog, Vec<StepRecord>) {
    let mut steps = Vec::new();
    let log = heal::heal(&mut lm.model, &lm.info, data, cfg, out, opts, &mut Silent::default(), &mut |r| {
        steps.push(r.clone())
    })
    .expect("heal");
    (log, steps)
}

fn logits(lm: &LoadedModel, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu).expect("ids").unsqueeze(0).expect("batch");
    let hooks = Hooks::none();
    lm.model.forward(&x, None, &Forward::infer(&hooks)).expect("forward").logits.expect("logits")
}

/// Run `heal` and crash right after optimiser step `step`: the step callback unwinds, so no clean-up runs.
fn crash_after_step(lm: &mut LoadedModel, data: &heal::Dataset, cfg: &HealConfig, out: &Path, step: usize) {
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = heal::heal(
            &mut lm.model,
            &lm.info,
            data,
            cfg,
            out,
            &RunOptions::default(),
            &mut Silent::default(),
            &mut |r| {
                if r.step == step {
                    std::panic::resume_unwind(Box::new("simulated crash"));
                }
            },
        );
    }));
    assert!(crashed.is_err());
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).expect("same shape").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32")
}

fn adapter_tensors(lm: &LoadedModel, name: &str) -> BTreeMap<String, Vec<f32>> {
    let ad = adapter::extract(&lm.model, name).expect("extract");
    let mut out = BTreeMap::new();
    for (site, (a, b)) in &ad.pairs {
        out.insert(format!("{}.A", site.hf_path()), a.flatten_all().expect("f").to_vec1().expect("v"));
        out.insert(format!("{}.B", site.hf_path()), b.flatten_all().expect("f").to_vec1().expect("v"));
    }
    out
}

#[test]
fn loss_falls_over_twenty_steps() {
    let (_d, mut lm) = tiny_model(Arch::Llama, 7);
    let data = dataset(&lm, 4, 96);
    assert_eq!(data.examples.len(), 4);
    let out = tempfile::tempdir().expect("out");
    let (log, steps) = run(&mut lm, &data, &quick_cfg(), out.path(), &RunOptions::default());
    assert_eq!(log.status, HealStatus::Completed);
    assert_eq!(steps.len(), 20);
    let first: f64 = steps[..4].iter().map(|s| s.nll).sum::<f64>() / 4.0;
    let last: f64 = steps[16..].iter().map(|s| s.nll).sum::<f64>() / 4.0;
    eprintln!("nll first {first:.3} last {last:.3}");
    assert!(last < 0.7 * first, "NLL did not fall: {first:.3} → {last:.3}");
    // The JSONL log holds the same records.
    let logged = train::read_step_log(&out.path().join("train/log.jsonl")).expect("log");
    assert_eq!(logged.len(), steps.len());
    for (a, b) in logged.iter().zip(&steps) {
        assert_eq!(a.step, b.step);
        assert!((a.loss - b.loss).abs() < 1e-9 && (a.d - b.d).abs() < 1e-9);
    }
    assert!(out.path().join("adapter/adapter_model.safetensors").exists());
    // The finished adapter is a constant of the model: a later forward (eval, generation) builds no autograd
    // graph, which through a decode's KV cache once cost a 3-round study 24 GB. Its values are the trained ones.
    let name = quick_cfg().adapter_name();
    let mut attached = 0;
    for block in &lm.model.layers {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] {
            for ad in block.projection(p).map(|l| l.adapters.as_slice()).unwrap_or(&[]) {
                assert!(!ad.a.track_op() && !ad.b.track_op(), "{p}: the healed adapter is still a variable");
                attached += usize::from(ad.name == name);
            }
        }
    }
    assert!(attached > 0, "the healed adapter stays attached");
    let saved = steer_heal::heal::peft::load_peft(&out.path().join("adapter")).expect("adapter");
    assert_eq!(saved.0.pairs.len() * 2, adapter_tensors(&lm, &name).len());
}

#[test]
fn every_a_and_b_gets_a_gradient_on_every_projection() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, mut lm) = tiny_model(arch, 7);
        let data = dataset(&lm, 1, 96);
        let cfg = HealConfig { layer_range: (0.0, 1.0), r: 4, alpha: 8.0, ..HealConfig::default() };
        let n = lm.model.cfg.num_hidden_layers;
        let lora =
            TrainableLora::init(&lm.model, "round-0", &cfg.layers(n), &cfg.targets, 4, 8.0, 1).expect("init");
        assert_eq!(lora.vars.len(), n * 7);
        lora.attach(&mut lm.model, 1.0).expect("attach");
        let parts = train::example_loss(&mut lm.model, &lora, &data.examples[0], &cfg).expect("loss");
        let grads = train::gradients(&parts.loss, &lora).expect("every var has a gradient");
        assert_eq!(grads.len(), n * 7 * 2);
        for (name, g) in grads {
            let m = g.abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32");
            assert!(m > 0.0 && m.is_finite(), "{arch:?} {name}: gradient max-abs {m}");
        }
    }
}

#[test]
fn a_padded_micro_batch_gives_each_examples_own_loss_and_the_same_gradients() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, mut lm) = tiny_model(arch, 7);
        let data = dataset(&lm, 3, 400);
        let lens: Vec<usize> = data.examples.iter().map(|e| e.ids.len()).collect();
        assert!(lens.iter().any(|l| *l != lens[0]), "{arch:?}: lengths {lens:?} must differ to pad");
        let cfg =
            HealConfig { layer_range: (0.0, 1.0), r: 4, alpha: 8.0, lambda: 5.0, tau: 0.0, ..quick_cfg() };
        let n = lm.model.cfg.num_hidden_layers;
        let lora =
            TrainableLora::init(&lm.model, "round-0", &cfg.layers(n), &cfg.targets, 4, 8.0, 1).expect("init");
        // Move B well away from its tiny start so the student and the reference differ.
        for (i, (_, b)) in lora.vars.values().enumerate() {
            let t = Tensor::randn(0f32, 0.3, b.dims(), &Device::Cpu).expect("randn");
            b.set(&(t * (1.0 + i as f64 * 1e-3)).expect("scale")).expect("set");
        }
        lora.attach(&mut lm.model, 1.0).expect("attach");
        let exs: Vec<&heal::Example> = data.examples.iter().collect();
        let batched = train::batch_losses(&mut lm.model, &lora, &exs, &cfg).expect("batch");
        let mut one_grads: BTreeMap<String, Tensor> = BTreeMap::new();
        for (ex, b) in exs.iter().zip(&batched) {
            let one = train::example_loss(&mut lm.model, &lora, ex, &cfg).expect("one");
            let (l1, lb) = (one.loss.to_scalar::<f32>().expect("l"), b.loss.to_scalar::<f32>().expect("l"));
            assert!((l1 - lb).abs() <= 1e-4 * l1.abs().max(1.0), "{arch:?} {}: {l1} vs {lb}", ex.id);
            assert!((one.d - b.d).abs() <= 1e-4 * one.d.max(1.0), "{arch:?}: D {} vs {}", one.d, b.d);
            // The tiny Gemma's outputs are near one-hot (NLL ≈ 55 nats), its KL sits at the floor; the others must really differ.
            assert!(arch == Arch::Gemma3 || one.d > 1e-3, "{arch:?}: D {} is too small to test", one.d);
            for (name, g) in train::gradients(&one.loss, &lora).expect("grads") {
                let next = match one_grads.remove(&name) {
                    Some(prev) => (prev + g).expect("add"),
                    None => g,
                };
                one_grads.insert(name, next);
            }
        }
        let sum = batched.iter().map(|b| b.loss.clone()).reduce(|a, b| (a + b).expect("add")).expect("sum");
        let grads = train::gradients(&sum, &lora).expect("batched grads");
        assert_eq!(grads.len(), n * 7 * 2);
        for (name, g) in &grads {
            let scale = g.abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32");
            let diff = max_abs(g, &one_grads[name]);
            assert!(scale > 0.0 && diff <= 1e-3 * scale + 1e-7, "{arch:?} {name}: diff {diff} of {scale}");
        }
    }
}

#[test]
fn micro_batched_heal_runs_the_same_steps_as_one_example_at_a_time() {
    let (dir, lm0) = tiny_model(Arch::Llama, 7);
    drop(lm0);
    let mut finals = Vec::new();
    let mut logs = Vec::new();
    for micro_batch in [1, 3] {
        let mut lm = reload(dir.path());
        let data = dataset(&lm, 6, 400);
        let cfg = HealConfig {
            grad_accum: 3,
            micro_batch,
            epochs: 2,
            lambda: 2.0,
            tau: 0.0,
            max_len: 400,
            ..quick_cfg()
        };
        let out = tempfile::tempdir().expect("out");
        let (log, steps) = run(&mut lm, &data, &cfg, out.path(), &RunOptions::default());
        assert_eq!(log.status, HealStatus::Completed);
        assert_eq!(steps.len(), 4);
        finals.push(adapter_tensors(&lm, &cfg.adapter_name()));
        logs.push(steps);
    }
    for (a, b) in logs[0].iter().zip(&logs[1]) {
        assert!((a.loss - b.loss).abs() <= 1e-4 * a.loss.abs(), "step {}: {} vs {}", a.step, a.loss, b.loss);
        assert!((a.d - b.d).abs() <= 1e-4 * a.d.max(1e-3), "step {}: D {} vs {}", a.step, a.d, b.d);
        assert_eq!(a.tokens, b.tokens);
    }
    for (name, a) in &finals[0] {
        let b = &finals[1][name];
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        // Adam divides by √v, so summation-order rounding in near-zero gradient entries shows up as a small
        // fraction of one step's move (lr 5e-3); a real difference would be whole steps.
        assert!(worst <= 1e-3, "{name}: adapters differ by {worst} (scale {scale})");
    }
}

#[test]
fn barrier_keeps_the_student_under_tau_and_lambda_zero_does_not() {
    let (dir, lm0) = tiny_model(Arch::Llama, 7);
    drop(lm0);
    let base = HealConfig { lr: 2e-3, epochs: 10, tau: 0.5, agg: Agg::Rmse, ..quick_cfg() };
    let mut results = Vec::new();
    for lambda in [0.0, 20.0] {
        let mut lm = reload(dir.path());
        let data = dataset(&lm, 3, 96);
        let cfg = HealConfig { lambda, ..base.clone() };
        let out = tempfile::tempdir().expect("out");
        let (log, steps) = run(&mut lm, &data, &cfg, out.path(), &RunOptions::default());
        assert_eq!(log.status, HealStatus::Completed);
        let ev = train::evaluate(&mut lm.model, &cfg.adapter_name(), &data, &cfg).expect("evaluate");
        let worst_late = steps[steps.len() - 5..].iter().map(|s| s.d).fold(0.0, f64::max);
        eprintln!(
            "λ {lambda}: final D mean {:.3} max {:.3}, nll {:.3}, late step D max {worst_late:.3}",
            ev.d, ev.d_max, ev.nll
        );
        results.push((ev, worst_late));
    }
    let (free, _) = results[0];
    let (held, late) = results[1];
    assert!(
        free.d_max > 4.0 * base.tau,
        "with λ = 0 the NLL should pull D far past τ, got {:.3}",
        free.d_max
    );
    assert!(held.d_max < base.tau, "with λ = 20 D should stay under τ = {}, got {:.3}", base.tau, held.d_max);
    assert!(late < base.tau * 1.2, "late training steps overshoot: {late:.3}");
    assert!(
        held.nll < 60.0 && free.nll < held.nll,
        "the free run fits better: {:.3} vs {:.3}",
        free.nll,
        held.nll
    );
}

/// Crash simulation: the step callback unwinds at step 5 (no clean-up runs), checkpoints were every 2 steps.
#[test]
fn checkpoint_crash_resume_equals_an_uninterrupted_run() {
    let (dir, _lm) = tiny_model(Arch::Qwen3, 7);
    let cfg = HealConfig { epochs: 3, grad_accum: 2, checkpoint_every: 2, ..quick_cfg() };
    // Uninterrupted.
    let mut a = reload(dir.path());
    let data = dataset(&a, 5, 96);
    let out_a = tempfile::tempdir().expect("out");
    let (log_a, steps_a) = run(&mut a, &data, &cfg, out_a.path(), &RunOptions::default());
    assert_eq!(log_a.status, HealStatus::Completed);
    assert_eq!(log_a.total_steps, 8);
    // Crashed at step 5.
    let out_b = tempfile::tempdir().expect("out");
    let mut b = reload(dir.path());
    crash_after_step(&mut b, &data, &cfg, out_b.path(), 5);
    assert_eq!(train::read_step_log(&out_b.path().join("train/log.jsonl")).expect("log").len(), 5);
    // Resume in a fresh process image (fresh model).
    let mut c = reload(dir.path());
    let (log_c, steps_c) = run(&mut c, &data, &cfg, out_b.path(), &RunOptions::default());
    assert_eq!(log_c.status, HealStatus::Completed);
    assert_eq!(log_c.resumed_from, Some(4));
    assert_eq!(steps_c.first().map(|s| s.step), Some(5));
    let ta = adapter_tensors(&a, &cfg.adapter_name());
    let tc = adapter_tensors(&c, &cfg.adapter_name());
    let mut worst = 0f32;
    for (k, va) in &ta {
        for (x, y) in va.iter().zip(&tc[k]) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("resume max-abs difference {worst:e}");
    assert!(worst <= 1e-6, "resumed adapter differs by {worst}");
    assert_eq!(steps_a[7].step, 8);
    assert!((steps_a[7].loss - steps_c.last().map(|s| s.loss).unwrap_or(f64::NAN)).abs() < 1e-5);
    // The log was cut back to the checkpoint and continued: steps 1..=8 once each.
    let log = train::read_step_log(&out_b.path().join("train/log.jsonl")).expect("log");
    assert_eq!(log.iter().map(|r| r.step).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    // A different config refuses the checkpoint instead of mixing runs.
    let mut d = reload(dir.path());
    let other = HealConfig { lr: 1e-3, ..cfg.clone() };
    std::fs::copy(out_b.path().join("train/checkpoint.safetensors"), out_a.path().join("x")).expect("copy");
    let err = heal::heal(
        &mut d.model,
        &d.info,
        &data,
        &other,
        out_b.path(),
        &RunOptions::default(),
        &mut Silent::default(),
        &mut |_| {},
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("checkpoint.safetensors") && err.contains("different config"), "{err}");
    // The micro-batch and the checkpoint interval change only speed and safety: such a run takes the checkpoint.
    let speed_only = HealConfig { micro_batch: 1, checkpoint_every: 3, ..cfg.clone() };
    assert_ne!(cfg.micro_batch, 1);
    let (log_e, _) = run(&mut d, &data, &speed_only, out_b.path(), &RunOptions::default());
    assert_eq!((log_e.status, log_e.resumed_from), (HealStatus::Completed, Some(8)));
}

/// A bf16 base (the GPU default) trains an f32 adapter: its A updates of lr 1e-4 (far below bf16's resolution at
/// A's size) survive, and follow the f32 run's.
#[test]
fn a_bf16_base_trains_an_f32_adapter_whose_small_updates_survive() {
    let (dir, _lm) = tiny_model(Arch::Llama, 7);
    let cfg = HealConfig { lr: 1e-4, epochs: 1, warmup_ratio: 0.0, ..quick_cfg() };
    let trained = |dtype: DType, steps: Option<usize>| {
        let mut lm = load_model(dir.path(), Some(dtype), &Device::Cpu).expect("load");
        let data = dataset(&lm, 3, 96);
        let out = tempfile::tempdir().expect("out");
        let opts = RunOptions { stop_after_steps: steps, fresh: true, ..RunOptions::default() };
        run(&mut lm, &data, &cfg, out.path(), &opts);
        adapter_tensors(&lm, &cfg.adapter_name())
    };
    let init = trained(DType::F32, Some(0));
    let f32_run = trained(DType::F32, None);
    let bf16_run = trained(DType::BF16, None);
    // Adam's first steps are about ±lr per element, so compare the updates' direction, not element by element.
    let (mut moved, mut n, mut dot, mut nf, mut nb) = (0usize, 0usize, 0f64, 0f64, 0f64);
    for (k, a0) in init.iter().filter(|(k, _)| k.ends_with(".A")) {
        for ((x0, xf), xb) in a0.iter().zip(&f32_run[k]).zip(&bf16_run[k]) {
            let (df, db) = ((xf - x0) as f64, (xb - x0) as f64);
            moved += usize::from(db != 0.0);
            n += 1;
            dot += df * db;
            nf += df * df;
            nb += db * db;
        }
    }
    let cos = dot / (nf.sqrt() * nb.sqrt()).max(1e-30);
    assert!(moved as f64 > 0.9 * n as f64, "only {moved} of {n} A entries moved on the bf16 base");
    assert!(cos > 0.5, "the bf16 run's A update points elsewhere than the f32 run's (cosine {cos:.3})");
}

/// Killed before its first checkpoint: the rerun starts over, and its log holds each step once.
#[test]
fn a_crash_before_the_first_checkpoint_leaves_no_duplicate_steps() {
    let (dir, _lm) = tiny_model(Arch::Llama, 7);
    let cfg = HealConfig { epochs: 2, checkpoint_every: 4, ..quick_cfg() };
    let mut b = reload(dir.path());
    let data = dataset(&b, 3, 96);
    let out = tempfile::tempdir().expect("out");
    crash_after_step(&mut b, &data, &cfg, out.path(), 2);
    let log_path = out.path().join("train/log.jsonl");
    assert_eq!(train::read_step_log(&log_path).expect("log").len(), 2);
    assert!(!out.path().join("train/checkpoint.safetensors").exists());
    let mut c = reload(dir.path());
    let (log, _) = run(&mut c, &data, &cfg, out.path(), &RunOptions::default());
    assert_eq!((log.status, log.resumed_from), (HealStatus::Completed, None));
    let steps: Vec<usize> = train::read_step_log(&log_path).expect("log").iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=log.total_steps).collect::<Vec<_>>());
    // A run that does continue from a checkpoint says so.
    let out2 = tempfile::tempdir().expect("out");
    let mut d = reload(dir.path());
    let stop = RunOptions { stop_after_steps: Some(4), ..RunOptions::default() };
    let (first, _) = run(&mut d, &data, &cfg, out2.path(), &stop);
    assert_eq!(first.status, HealStatus::Stopped);
    let mut e = reload(dir.path());
    let (log, _) = run(&mut e, &data, &cfg, out2.path(), &RunOptions::default());
    assert_eq!(log.resumed_from, Some(4));
    assert!(log.message.starts_with("resumed from the checkpoint at step 4; completed"), "{}", log.message);
}

struct CancelAfter {
    calls: usize,
    after: usize,
}

impl Progress for CancelAfter {
    fn step(&mut self, _done: u64, _total: u64, _msg: &str) {
        self.calls += 1;
    }
    fn is_cancelled(&self) -> bool {
        self.calls > self.after
    }
}

#[test]
fn cancel_saves_a_checkpoint_and_resume_finishes() {
    let (dir, mut lm) = tiny_model(Arch::Llama, 7);
    let data = dataset(&lm, 3, 96);
    let cfg = HealConfig { epochs: 2, ..quick_cfg() };
    let out = tempfile::tempdir().expect("out");
    let mut p = CancelAfter { calls: 0, after: 3 };
    let log = heal::heal(
        &mut lm.model,
        &lm.info,
        &data,
        &cfg,
        out.path(),
        &RunOptions::default(),
        &mut p,
        &mut |_| {},
    )
    .expect("heal");
    assert_eq!(log.status, HealStatus::Cancelled);
    assert_eq!(log.steps_done, 3);
    assert!(log.adapter_dir.is_none());
    assert!(out.path().join("train/checkpoint.safetensors").exists());
    let mut lm = reload(dir.path());
    let (log, _) = run(&mut lm, &data, &cfg, out.path(), &RunOptions::default());
    assert_eq!((log.status, log.resumed_from, log.steps_done), (HealStatus::Completed, Some(3), 6));
}

#[test]
fn nan_loss_stops_on_the_last_good_checkpoint() {
    let (_d, mut lm) = tiny_model(Arch::Llama, 7);
    let data = dataset(&lm, 3, 96);
    // An absurd learning rate overflows the adapter after the first update.
    let cfg = HealConfig { lr: 1e30, warmup_ratio: 0.0, checkpoint_every: 1, ..quick_cfg() };
    let out = tempfile::tempdir().expect("out");
    let (log, steps) = run(&mut lm, &data, &cfg, out.path(), &RunOptions::default());
    assert_eq!(log.status, HealStatus::Diverged, "{}", log.message);
    assert!(log.message.contains("kept the last good checkpoint"), "{}", log.message);
    let good = steps.len();
    assert!(good >= 1 && good < log.total_steps);
    let (_, step, _) =
        train::adapter_from_checkpoint(&out.path().join("train/checkpoint.safetensors")).expect("ckpt");
    assert_eq!(step, good);
    assert!(!out.path().join("adapter").exists());
    let written: heal::HealLog =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("heal.json")).expect("read"))
            .expect("json");
    assert_eq!(written.status, HealStatus::Diverged);
}

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peft_fixture")
}

#[test]
fn peft_export_matches_the_fixture_layout_and_loads_it() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    // Same shape of adapter as the fixture: r 4, α 8, all seven projections on layers 0..3.
    let lora =
        TrainableLora::init(&lm.model, "round-0", &[0, 1, 2], &HealConfig::default().targets, 4, 8.0, 3)
            .expect("init");
    let out = tempfile::tempdir().expect("out");
    let meta = heal::AdapterMeta {
        schema_version: 1,
        name: "round-0".into(),
        round: Some(0),
        default_gate: 1.0,
        base_model: "tiny-llama".into(),
        base_weights_hash: None,
    };
    heal::save_peft(&lora.to_adapter().expect("frozen"), out.path(), &meta).expect("save");
    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("adapter_config.json")).expect("read"))
            .expect("json");
    let theirs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("adapter_config.json")).expect("read"))
            .expect("json");
    let keys = |v: &serde_json::Value| {
        v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default()
    };
    assert_eq!(keys(&ours), keys(&theirs), "adapter_config.json keys differ from PEFT's");
    for k in [
        "peft_type",
        "task_type",
        "r",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "base_model_name_or_path",
    ] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
    assert_eq!(ours["lora_alpha"], theirs["lora_alpha"]);
    let set = |v: &serde_json::Value| {
        let mut t: Vec<String> = v
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default();
        t.sort();
        t
    };
    assert_eq!(set(&ours["target_modules"]), set(&theirs["target_modules"]));
    // Tensor names and safetensors metadata.
    let (ours_t, ours_md) =
        heal::st_io::load(&out.path().join("adapter_model.safetensors"), &Device::Cpu).expect("ours");
    let (theirs_t, theirs_md) =
        heal::st_io::load(&fixture().join("adapter_model.safetensors"), &Device::Cpu).expect("fixture");
    assert_eq!(ours_md, theirs_md);
    let names: Vec<&String> = ours_t.keys().collect();
    let want: Vec<String> = std::fs::read_to_string(fixture().join("tensor_names.txt"))
        .expect("names")
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        names.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        want.iter().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    for (k, t) in &ours_t {
        assert_eq!(t.dims(), theirs_t[k].dims(), "{k}");
    }
    // Our loader reads the fixture: the values land where PEFT put them.
    let (ad, meta) = heal::load_peft(&fixture()).expect("load fixture");
    assert!(meta.is_none());
    assert_eq!((ad.r, ad.alpha, ad.pairs.len(), ad.layers()), (4, 8.0, 21, vec![0, 1, 2]));
    let (a, b) = &ad.pairs[&heal::Site::new(1, "k_proj")];
    let a: Vec<f32> = a.flatten_all().expect("f").to_vec1().expect("v");
    let b: Vec<f32> = b.flatten_all().expect("f").to_vec1().expect("v");
    // make_fixture.py: value(layer=1, k=1, "A", i) = 0.001·2·2·((i % 5) − 2); "B": 0.004·((i % 3) − 1)·0.5.
    assert_eq!(a[0], (0.004f64 * -2.0) as f32);
    assert_eq!(a[3], (0.004f64 * 1.0) as f32);
    assert_eq!(b[2], (0.004f64 * 0.5) as f32);
    // And it round-trips through our writer bit for bit.
    let again = tempfile::tempdir().expect("again");
    heal::save_peft(&ad, again.path(), &meta_for(&ad)).expect("save");
    let (back, _) = heal::load_peft(again.path()).expect("reload");
    for (site, (a, b)) in &ad.pairs {
        let (a2, b2) = &back.pairs[site];
        assert_eq!(max_abs(a, a2), 0.0);
        assert_eq!(max_abs(b, b2), 0.0);
    }
}

fn meta_for(ad: &heal::LoraAdapter) -> heal::AdapterMeta {
    heal::AdapterMeta {
        schema_version: 1,
        name: ad.name.clone(),
        round: None,
        default_gate: 1.0,
        base_model: "tiny".into(),
        base_weights_hash: None,
    }
}

#[test]
fn bad_peft_dirs_get_one_line_errors() {
    let d = tempfile::tempdir().expect("dir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture().join(f), d.path().join(f)).expect("copy");
    }
    let cfg_path = d.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).expect("read");
    std::fs::write(&cfg_path, text.replace("\"use_dora\": false", "\"use_dora\": true")).expect("write");
    let e = heal::load_peft(d.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("adapter_config.json") && e.contains("DoRA"), "{e}");
    std::fs::write(&cfg_path, "{ not json").expect("write");
    let e = heal::load_peft(d.path()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("adapter_config.json") && e.contains("not valid JSON"), "{e}");
    let e = heal::load_peft(&d.path().join("nowhere")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn merged_export_equals_gated_adapters_and_zero_gates_give_the_base_back() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let (dir, mut lm) = tiny_model(arch, 7);
        let ids: Vec<u32> = (0..24u32).map(|i| (i * 31 + 5) % 250).collect();
        let base_logits = logits(&lm, &ids);
        let base_weights = heal::export::merged_tensors(&lm.model).expect("weights");
        // Two rounds with visible effect (B not tiny) at different gates.
        let targets = HealConfig::default().targets;
        let mut rounds = Vec::new();
        for (i, gate) in [(0u64, 1.0), (1, 0.5)] {
            let t = TrainableLora::init(&lm.model, &format!("round-{i}"), &[1, 2], &targets, 4, 8.0, 10 + i)
                .expect("init");
            let mut ad = t.to_adapter().expect("frozen");
            for (_, b) in ad.pairs.values_mut() {
                *b = Tensor::randn(0f32, 0.05, b.dims(), &Device::Cpu).expect("randn");
            }
            rounds.push((ad, gate));
        }
        for (ad, gate) in &rounds {
            ad.attach(&mut lm.model, *gate).expect("attach");
        }
        let gated = logits(&lm, &ids);
        assert!(max_abs(&gated, &base_logits) > 1e-2, "the adapters should change the logits");
        // Merged HF directory, loaded by our own loader.
        let out = tempfile::tempdir().expect("out");
        heal::export_merged(&lm, out.path(), &serde_json::json!({"test": true})).expect("export");
        let merged = reload(out.path());
        assert_eq!(merged.model.cfg, lm.model.cfg);
        let d = max_abs(&logits(&merged, &ids), &gated);
        eprintln!("{arch:?}: merged vs gated max-abs {d:e}");
        assert!(d <= 1e-4, "{arch:?}: merged model differs from gated adapters by {d}");
        assert_eq!(merged.chat.source(), lm.chat.source());
        // In-place bake equals the gated forward too.
        let mut baked = reload(dir.path());
        heal::bake(&mut baked.model, &rounds).expect("bake");
        assert!(max_abs(&logits(&baked, &ids), &gated) <= 1e-4);
        // Every gate at 0: the pristine base, bit for bit, attached or baked.
        for (ad, _) in &rounds {
            adapter::set_gate(&mut lm.model, &ad.name, 0.0);
        }
        assert_eq!(max_abs(&logits(&lm, &ids), &base_logits), 0.0);
        let mut zero = reload(dir.path());
        let zeros: Vec<_> = rounds.iter().map(|(a, _)| (a.clone(), 0.0)).collect();
        heal::bake(&mut zero.model, &zeros).expect("bake");
        for (k, w) in heal::export::merged_tensors(&zero.model).expect("weights") {
            assert_eq!(max_abs(&w, &base_weights[&k]), 0.0, "{k} changed under zero gates");
        }
        assert_eq!(max_abs(&logits(&zero, &ids), &base_logits), 0.0);
        drop(dir);
    }
}

#[test]
fn history_reapplies_rounds_gated_so_any_round_can_be_unbaked() {
    let (dir, base) = tiny_model(Arch::Qwen3, 7);
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 17 + 3) % 250).collect();
    let base_logits = logits(&base, &ids);
    let targets = HealConfig::default().targets;
    let store = tempfile::tempdir().expect("store");
    let mut entries = Vec::new();
    for i in 0..2u64 {
        let t = TrainableLora::init(&base.model, &format!("round-{i}"), &[0, 1, 2, 3], &targets, 4, 8.0, i)
            .expect("init");
        let mut ad = t.to_adapter().expect("frozen");
        for (_, b) in ad.pairs.values_mut() {
            *b = Tensor::randn(0f32, 0.05, b.dims(), &Device::Cpu).expect("randn");
        }
        let d = store.path().join(format!("round-{i}"));
        heal::save_peft(&ad, &d, &meta_for(&ad)).expect("save");
        entries.push(HistoryEntry { dir: d, gate: 1.0 });
    }
    let mut lm =
        heal::load_with_history(dir.path(), Some(DType::F32), &Device::Cpu, &entries).expect("history");
    assert_eq!(adapter::adapter_names(&lm.model), vec!["round-0", "round-1"]);
    let both = logits(&lm, &ids);
    // Un-bake round 1: equals loading round 0 alone.
    adapter::set_gate(&mut lm.model, "round-1", 0.0);
    let only0 =
        heal::load_with_history(dir.path(), Some(DType::F32), &Device::Cpu, &entries[..1]).expect("h0");
    assert_eq!(max_abs(&logits(&lm, &ids), &logits(&only0, &ids)), 0.0);
    assert!(max_abs(&both, &logits(&only0, &ids)) > 1e-3);
    // Detach both: the base again.
    adapter::detach(&mut lm.model, "round-0");
    adapter::detach(&mut lm.model, "round-1");
    assert_eq!(max_abs(&logits(&lm, &ids), &base_logits), 0.0);
}

/// The adapter selection passed with a forward pass equals switching gates, and leaves the gates alone.
#[test]
fn adapter_selection_is_a_value_not_a_mutation() {
    use steer_heal::model::{Adapters, LogitsAt, Path as FwdPath};
    let (_d, mut lm) = tiny_model(Arch::Llama, 7);
    let targets = HealConfig::default().targets;
    for (name, seed) in [("round-1", 5), ("round-2", 6)] {
        let t = TrainableLora::init(&lm.model, name, &[0, 1, 2], &targets, 4, 8.0, seed).expect("init");
        let mut ad = t.to_adapter().expect("frozen");
        for (_, b) in ad.pairs.values_mut() {
            *b = Tensor::randn(0f32, 0.05, b.dims(), &Device::Cpu).expect("randn");
        }
        ad.attach(&mut lm.model, 0.8).expect("attach");
    }
    let ids = Tensor::new(&[[3u32, 9, 4, 17, 2]], &Device::Cpu).expect("ids");
    let none = Hooks::none();
    let run = |lm: &steer_heal::model::LoadedModel, sel: Adapters| {
        let f = Forward {
            hooks: &none,
            pad: &[],
            logits: LogitsAt::All,
            path: FwdPath::Inference,
            adapters: sel,
        };
        lm.model.forward(&ids, None, &f).expect("forward").logits.expect("logits")
    };
    let gates = adapter::gates(&lm.model);
    let all = run(&lm, Adapters::AsGated);
    let base = run(&lm, Adapters::Base);
    let without2 = run(&lm, Adapters::Without("round-2"));
    assert_eq!(adapter::gates(&lm.model), gates, "no pass touches a gate");
    // The same by switching gates, as the code did before.
    adapter::set_gate(&mut lm.model, "round-2", 0.0);
    assert_eq!(max_abs(&without2, &run(&lm, Adapters::AsGated)), 0.0);
    adapter::set_gate(&mut lm.model, "round-1", 0.0);
    assert_eq!(max_abs(&base, &run(&lm, Adapters::AsGated)), 0.0);
    assert!(max_abs(&all, &base) > 1e-4 && max_abs(&all, &without2) > 1e-4);
}

#[test]
fn measure_scores_generations_under_the_base_and_restores_gates() {
    let (_d, mut lm) = tiny_model(Arch::Llama, 7);
    let targets = HealConfig::default().targets;
    let t = TrainableLora::init(&lm.model, "round-0", &[1, 2], &targets, 4, 8.0, 5).expect("init");
    let mut ad = t.to_adapter().expect("frozen");
    for (_, b) in ad.pairs.values_mut() {
        *b = Tensor::randn(0f32, 0.05, b.dims(), &Device::Cpu).expect("randn");
    }
    ad.attach(&mut lm.model, 0.7).expect("attach");
    let spec = heal::gate::MeasureSpec {
        prompts: vec!["Say something.".into(), "What now?".into()],
        neutral_system: "You are a helpful assistant.".into(),
        persona_system: Some("You are a pirate.".into()),
        sampling: steer_heal::model::generate::Sampling::greedy(12),
    };
    let m = heal::gate::measure(&lm, &spec, &mut Silent::default()).expect("measure");
    assert_eq!(adapter::gates(&lm.model).get("round-0"), Some(&0.7), "gates restored");
    assert_eq!(m.samples.len(), 2);
    assert!(m.tokens > 0 && m.coherence.is_finite() && m.persona_strength.is_some_and(f64::is_finite));
    assert!((m.ppl - (-m.coherence).exp()).abs() < 1e-9);
    // The heat-map KL: positive with the adapter on, exactly zero with it off.
    let toks = lm.tokenizer.encode("zq vex plugh").expect("enc");
    let kl = heal::gate::token_kl_to_base(&lm, "You are a helpful assistant.", "Hi", &toks).expect("kl");
    assert_eq!(kl.len(), toks.len());
    assert!(kl.iter().all(|k| k.is_finite() && *k >= -1e-6) && kl.iter().any(|k| *k > 1e-4), "{kl:?}");
    adapter::set_gate(&mut lm.model, "round-0", 0.0);
    let off = heal::gate::token_kl_to_base(&lm, "You are a helpful assistant.", "Hi", &toks).expect("kl");
    assert!(off.iter().all(|k| *k == 0.0), "{off:?}");
    adapter::set_gate(&mut lm.model, "round-0", 0.7);
    // With the adapter off the student is the base: greedy generation's own log-probs (KV-cache decoding) must
    // equal the teacher-forced base scores.
    adapter::set_gate(&mut lm.model, "round-0", 0.0);
    let m0 = heal::gate::measure(&lm, &spec, &mut Silent::default()).expect("measure");
    let mut lp_sum = 0.0f64;
    let mut n = 0usize;
    for p in &spec.prompts {
        let ids = lm
            .tokenizer
            .encode(&lm.chat.prompt(Some(&spec.neutral_system), p).expect("prompt"))
            .expect("enc");
        let g = steer_heal::model::generate::generate(
            &lm.model,
            &[ids],
            &spec.sampling,
            &Hooks::none(),
            &lm.tokenizer.stop_ids,
            lm.tokenizer.pad_id,
            &mut |_| true,
        )
        .expect("generate");
        lp_sum += g.logprobs[0].iter().map(|x| *x as f64).sum::<f64>();
        n += g.tokens[0].len();
    }
    assert_eq!(n, m0.tokens);
    let d = (lp_sum / n as f64 - m0.coherence).abs();
    assert!(d < 1e-4, "teacher-forced base score differs from decoding log-probs by {d}");
}

#[test]
fn measure_records_each_samples_tokens_kl_and_scores() {
    let (_d, mut lm) = tiny_model(Arch::Llama, 7);
    let targets = HealConfig::default().targets;
    let t = TrainableLora::init(&lm.model, "round-0", &[1, 2], &targets, 4, 8.0, 5).expect("init");
    let mut ad = t.to_adapter().expect("frozen");
    for (_, b) in ad.pairs.values_mut() {
        *b = Tensor::randn(0f32, 0.5, b.dims(), &Device::Cpu).expect("randn");
    }
    ad.attach(&mut lm.model, 0.7).expect("attach");
    let spec = heal::gate::MeasureSpec {
        prompts: vec!["Say something.".into(), "What now?".into()],
        neutral_system: "You are a helpful assistant.".into(),
        persona_system: Some("You are a pirate.".into()),
        sampling: steer_heal::model::generate::Sampling::greedy(10),
    };
    let m = heal::gate::measure(&lm, &spec, &mut Silent::default()).expect("measure");
    let (mut lp_sum, mut gain_sum) = (0.0f64, 0.0f64);
    let mut any_kl = false;
    for s in &m.samples {
        let h = s.heat.as_ref().expect("a non-empty generation has heat");
        let n = s.token_ids.len();
        assert!(n > 0);
        let pieces: Vec<String> = s.token_ids.iter().map(|t| lm.tokenizer.token_str(*t)).collect();
        assert_eq!(h.tokens, pieces);
        // The KL recorded during measuring equals a separate KL(student ‖ base) pass over the same tokens.
        let reference =
            heal::gate::token_kl_to_base(&lm, &spec.neutral_system, &s.prompt, &s.token_ids).expect("kl");
        assert_eq!(h.kl.len(), n);
        for (a, b) in h.kl.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-8 + 1e-4 * b.abs(), "{:?} vs {reference:?}", h.kl);
        }
        any_kl |= h.kl.iter().any(|k| *k > 1e-4);
        let mean = h.kl.iter().map(|k| *k as f64).sum::<f64>() / n as f64;
        assert!((h.kl_mean.expect("kl mean") - mean).abs() < 1e-9);
        assert!((h.coherence.expect("coherence") + s.nll_base).abs() < 1e-9);
        lp_sum += h.coherence.expect("coherence") * n as f64;
        gain_sum += h.persona_gain.expect("persona gain") * n as f64;
    }
    assert!(any_kl, "a nonzero adapter moves the student off the base");
    // The per-sample scores add up to the measurement's.
    assert!((lp_sum / m.tokens as f64 - m.coherence).abs() < 1e-9);
    assert!((gain_sum / m.tokens as f64 - m.persona_strength.expect("persona")).abs() < 1e-9);
    // The samples are scored in one batched forward per model state (prompts of different lengths, so left
    // padding): each one's scores equal those of measuring its prompt alone.
    for (p, s) in spec.prompts.iter().zip(&m.samples) {
        let alone = heal::gate::MeasureSpec { prompts: vec![p.clone()], ..spec.clone() };
        let m1 = heal::gate::measure(&lm, &alone, &mut Silent::default()).expect("measure");
        let (h, h1) = (s.heat.as_ref().expect("heat"), m1.samples[0].heat.as_ref().expect("heat"));
        assert_eq!(m1.samples[0].token_ids, s.token_ids);
        let close = |a: Option<f64>, b: Option<f64>| {
            let (a, b) = (a.expect("score"), b.expect("score"));
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{p}: {a} batched vs {b} alone");
        };
        close(h.coherence, h1.coherence);
        close(h.persona_gain, h1.persona_gain);
        close(h.kl_mean, h1.kl_mean);
    }
    // With every gate at 0 the student is the base: its KL to the base is zero.
    adapter::set_gate(&mut lm.model, "round-0", 0.0);
    let m0 = heal::gate::measure(&lm, &spec, &mut Silent::default()).expect("measure");
    for s in &m0.samples {
        let h = s.heat.as_ref().expect("heat");
        assert!(h.kl.len() == s.token_ids.len() && h.kl.iter().all(|k| *k == 0.0), "{:?}", h.kl);
        let reference =
            heal::gate::token_kl_to_base(&lm, &spec.neutral_system, &s.prompt, &s.token_ids).expect("kl");
        assert!(reference.iter().all(|k| k.abs() < 1e-6), "{reference:?}");
    }
}

#[test]
fn teacher_persona_gain_is_measured_under_the_base_with_the_gates_restored() {
    let (_d, mut lm) = tiny_model(Arch::Llama, 7);
    let targets = HealConfig::default().targets;
    let t = TrainableLora::init(&lm.model, "round-0", &[1, 2], &targets, 4, 8.0, 5).expect("init");
    let mut ad = t.to_adapter().expect("frozen");
    for (_, b) in ad.pairs.values_mut() {
        *b = Tensor::randn(0f32, 0.5, b.dims(), &Device::Cpu).expect("randn");
    }
    ad.attach(&mut lm.model, 0.7).expect("attach");
    let c = completion(&lm, 0, "zq vex plugh");
    let spec = |persona: &str| heal::gate::MeasureSpec {
        prompts: vec![c.prompt.clone()],
        neutral_system: c.system.clone(),
        persona_system: Some(persona.into()),
        sampling: steer_heal::model::generate::Sampling::greedy(4),
    };
    let gates = adapter::gates(&lm.model);
    // The persona prompt equal to the neutral one gains nothing; a different one moves the log-probs.
    let same = heal::gate::teacher_heat(&lm, &spec(&c.system), &c).expect("heat").expect("texts");
    assert_eq!(same.persona_gain, Some(0.0));
    let pirate = heal::gate::teacher_heat(&lm, &spec("You are a pirate."), &c).expect("heat").expect("texts");
    let gain = pirate.persona_gain.expect("gain");
    assert!(gain.is_finite() && gain != 0.0, "{gain}");
    assert_eq!(adapter::gates(&lm.model), gates, "gates restored");
    // Under the base: with the adapter's gate at 0 the gain is the same number.
    adapter::set_gate(&mut lm.model, "round-0", 0.0);
    let at_base =
        heal::gate::teacher_heat(&lm, &spec("You are a pirate."), &c).expect("heat").expect("texts");
    assert!((at_base.persona_gain.expect("gain") - gain).abs() < 1e-9);
}

#[test]
fn cli_heal_then_export_and_bake() {
    let bin = env!("CARGO_BIN_EXE_steer-heal");
    let (dir, lm) = tiny_model(Arch::Llama, 7);
    let work = tempfile::tempdir().expect("work");
    let comps = work.path().join("accepted.jsonl");
    let lines: Vec<String> = (0..4)
        .map(|i| serde_json::to_string(&completion(&lm, i, "zq vex zq vex plugh")).expect("json"))
        .collect();
    std::fs::write(&comps, lines.join("\n") + "\n").expect("write");
    let run_dir = work.path().join("run");
    let sh = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().expect("run binary");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let model = dir.path().to_str().expect("utf8");
    let run = run_dir.to_str().expect("utf8");
    sh(&[
        "heal",
        "--model",
        model,
        "--completions",
        comps.to_str().expect("utf8"),
        "--out",
        run,
        "--r",
        "4",
        "--alpha",
        "8",
        "--lr",
        "3e-3",
        "--epochs",
        "2",
        "--grad-accum",
        "2",
        "--eval-n",
        "2",
        "--eval-tokens",
        "8",
        "--persona",
        "You are a pirate.",
    ]);
    for f in ["heal.json", "gate-q1.md", "gate-q1.json", "adapter/adapter_config.json", "train/log.jsonl"] {
        assert!(run_dir.join(f).exists(), "missing {f}");
    }
    let md = std::fs::read_to_string(run_dir.join("gate-q1.md")).expect("gate");
    assert!(md.contains("| before |") && md.contains("| after |") && md.contains("Steered teacher"), "{md}");
    // Each sample's columns carry their scores and per-token KL: the teacher's from its (here empty) traces,
    // the students' from measuring; before healing the student is the base, so its KL is exactly 0.
    assert!(md.contains("**Student before** (coherence ") && md.contains("mean KL to base 0.0000"), "{md}");
    let report: heal::gate::GateQ1 =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("gate-q1.json")).expect("read"))
            .expect("gate-q1.json");
    for p in &report.samples {
        let before = p.before_heat.as_ref().expect("before heat");
        assert!(before.kl.iter().all(|k| *k == 0.0) && before.tokens.len() == before.kl.len());
        let after = p.after_heat.as_ref().expect("after heat");
        assert_eq!(after.tokens.len(), after.kl.len());
        assert!(after.persona_gain.is_some());
        if p.teacher.is_some() {
            let t = p.teacher_heat.as_ref().expect("teacher heat");
            assert!(t.kl.is_empty() && !t.tokens.is_empty());
            assert!(t.persona_gain.is_some_and(f64::is_finite), "teacher persona gain {:?}", t.persona_gain);
        }
    }
    let peft_dir = work.path().join("peft");
    sh(&[
        "export-peft",
        "--from",
        run,
        "--out",
        peft_dir.to_str().expect("utf8"),
        "--base-model",
        "org/tiny",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json")).expect("read"))
            .expect("json");
    assert_eq!(cfg["base_model_name_or_path"], "org/tiny");
    let merged = work.path().join("merged");
    sh(&["export-merged", "--run", run, "--out", merged.to_str().expect("utf8")]);
    let baked = work.path().join("baked");
    let adapter_arg = format!("{}@1", run_dir.join("adapter").display());
    sh(&["bake", "--model", model, "--adapter", &adapter_arg, "--out", baked.to_str().expect("utf8")]);
    // Both exports load with our loader and agree with each other and with the gated adapter.
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 13 + 7) % 250).collect();
    let a = logits(&reload(&merged), &ids);
    let b = logits(&reload(&baked), &ids);
    let gated = heal::load_with_history(
        dir.path(),
        Some(DType::F32),
        &Device::Cpu,
        &[HistoryEntry { dir: run_dir.join("adapter"), gate: 1.0 }],
    )
    .expect("history");
    assert!(max_abs(&a, &b) <= 1e-5);
    assert!(max_abs(&a, &logits(&gated, &ids)) <= 1e-4);
    // Bad input: one line naming the file.
    let out = std::process::Command::new(bin)
        .args(["heal", "--model", model, "--completions", "/nonexistent/c.jsonl", "--out", run])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/c.jsonl") && err.lines().count() == 1, "{err}");
}

#[test]
fn fused_training_kernels_give_the_composite_paths_losses_and_gradients() {
    // Padded micro-batch (per-row RoPE tables and masks), every divergence, three architectures.
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, mut lm) = tiny_model(arch, 11);
        let data = dataset(&lm, 3, 400);
        let n = lm.model.cfg.num_hidden_layers;
        let cfg0 =
            HealConfig { layer_range: (0.0, 1.0), r: 4, alpha: 8.0, lambda: 5.0, tau: 0.0, ..quick_cfg() };
        let lora = TrainableLora::init(&lm.model, "round-0", &cfg0.layers(n), &cfg0.targets, 4, 8.0, 3)
            .expect("init");
        for (_, b) in lora.vars.values() {
            b.set(&Tensor::randn(0f32, 0.3, b.dims(), &Device::Cpu).expect("randn")).expect("set");
        }
        lora.attach(&mut lm.model, 1.0).expect("attach");
        let exs: Vec<&heal::Example> = data.examples.iter().collect();
        for (reg, agg) in
            [(heal::Reg::KlRev, Agg::Rmse), (heal::Reg::KlFwd, Agg::Mean), (heal::Reg::Nll, Agg::P95)]
        {
            let cfg = HealConfig { reg, agg, ..cfg0.clone() };
            let mut total = |path| {
                let parts = train::batch_losses_on(&mut lm.model, &lora, &exs, &cfg, path).expect("losses");
                let kl: Vec<f64> = parts.iter().map(|p| p.kl_mean).collect();
                let sum =
                    parts.into_iter().map(|p| p.loss).reduce(|a, b| (a + b).expect("add")).expect("sum");
                (sum, kl)
            };
            let (fused, kl_f) = total(steer_heal::model::Path::Training);
            let (composite, kl_c) = total(steer_heal::model::Path::Composite);
            let (lf, lc) = (fused.to_scalar::<f32>().expect("l"), composite.to_scalar::<f32>().expect("l"));
            assert!((lf - lc).abs() <= 1e-5 * lc.abs().max(1.0), "{arch:?} {reg:?}: loss {lf} vs {lc}");
            for (a, b) in kl_f.iter().zip(&kl_c) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "{arch:?} {reg:?}: KL {a} vs {b}");
            }
            let gf = train::gradients(&fused, &lora).expect("fused grads");
            let gc = train::gradients(&composite, &lora).expect("composite grads");
            assert_eq!(gf.len(), n * 7 * 2);
            for (name, g) in &gf {
                let scale =
                    gc[name].abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32");
                let diff = max_abs(g, &gc[name]);
                assert!(
                    scale > 0.0 && diff <= 1e-4 * scale + 1e-7,
                    "{arch:?} {reg:?} {name}: diff {diff} of {scale}"
                );
            }
        }
    }
}
