//! Steering on tiny random models: extraction, vector files, llama.cpp export, iso-KL dosing, steered
//! generation with traces, replay, the rewind watchdog, the walk-down controller and the headless CLI.
//!
//! Tiny Llama models (tied embeddings) mostly repeat their last token; the generation tests use a tiny Qwen3
//! (untied head), whose samples vary with the seed and the steering.

mod common;
use candle_core::{DType, Device, Tensor};
use common::tiny_model;
use std::collections::BTreeMap;
use std::path::Path;
use steer_heal::model::generate::{generate, Sampling};
use steer_heal::model::{
    tiny::make_tiny_model, Arch, Capture, CapturePositions, Forward, Hooks, LoadedModel, LogitsAt,
    Path as FwdPath,
};
use steer_heal::progress::Silent;
use steer_heal::steer::dose::{calibrate, measure_kl, teacher_forced_kl, DoseConfig, SolverConfig};
use steer_heal::steer::extract::{extract_mean_diff, random_like, ExtractConfig};
use steer_heal::steer::generate::{generate_completions, replay, requests_for, GenConfig, Request, Watchdog};
use steer_heal::steer::gguf::{export_gguf, import_gguf, to_gguf_bytes};
use steer_heal::steer::kl::{window_rmse, KlStats, Statistic};
use steer_heal::steer::vector::Method;
use steer_heal::steer::walkdown::{walk_down, Verdict, WalkDownConfig};
use steer_heal::steer::{Completion, Persona, SteerVector, Steering};

fn persona() -> Persona {
    Persona::default_authority().expect("default persona")
}

fn cfg(lm: &LoadedModel, layers: Vec<usize>, n: usize, batch: usize) -> ExtractConfig {
    ExtractConfig { layers, n_pairs: Some(n), batch_size: batch, ..ExtractConfig::for_model(lm) }
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().expect("flat").to_vec1().expect("f32")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn logits(lm: &LoadedModel, ids: &[u32], hooks: &Hooks) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu).expect("ids").unsqueeze(0).expect("batch");
    let f = Forward {
        hooks,
        pad: &[],
        logits: LogitsAt::All,
        path: FwdPath::Inference,
        adapters: steer_heal::model::Adapters::AsGated,
    };
    vec_of(&lm.model.forward(&x, None, &f).expect("forward").logits.expect("logits"))
}

fn prompt_ids(lm: &LoadedModel, user: &str) -> Vec<u32> {
    lm.tokenizer
        .encode(&lm.chat.prompt(Some("You are a helpful assistant."), user).expect("chat"))
        .expect("ids")
}

/// A mean-diff vector on the middle layers of a tiny model, L2-normalised so doses are in residual units.
fn unit_vector(lm: &LoadedModel) -> SteerVector {
    let mut c = cfg(lm, vec![1, 2], 12, 4);
    c.normalize = true;
    extract_mean_diff(lm, &persona(), &c, &mut Silent::default()).expect("extract")
}

#[test]
fn extraction_is_deterministic_and_batch_invariant() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let p = persona();
    let a = extract_mean_diff(&lm, &p, &cfg(&lm, vec![1, 2], 10, 4), &mut Silent::default()).expect("a");
    let b = extract_mean_diff(&lm, &p, &cfg(&lm, vec![1, 2], 10, 4), &mut Silent::default()).expect("b");
    let one = extract_mean_diff(&lm, &p, &cfg(&lm, vec![1, 2], 10, 1), &mut Silent::default()).expect("one");
    for l in [1, 2] {
        assert_eq!(vec_of(&a.directions[&l]), vec_of(&b.directions[&l]), "layer {l}: two runs differ");
        let d = max_abs(&vec_of(&a.directions[&l]), &vec_of(&one.directions[&l]));
        assert!(d < 1e-4, "layer {l}: batch 4 vs batch 1 differ by {d}");
    }
    assert_eq!(a.meta.n_pairs, 10);
    assert_eq!(a.meta.layers, vec![1, 2]);
    assert_eq!(a.meta.method, Method::MeanDiff);
    assert_eq!(a.meta.persona.as_ref().map(|r| r.sha256.clone()), Some(p.sha256.clone()));
    assert!(a.meta.norms.iter().all(|n| *n > 0.0));
}

#[test]
fn extraction_is_the_mean_difference_at_the_last_prompt_token() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let p = persona();
    let v = extract_mean_diff(&lm, &p, &cfg(&lm, vec![2], 3, 2), &mut Silent::default()).expect("extract");
    // Recompute by hand, one prompt at a time, reading the last position of the captured residual.
    let hooks = Hooks::capture(vec![2], CapturePositions::All);
    let mut acc = vec![0f32; lm.model.cfg.hidden_size];
    for (sys, sign) in [(&p.spec.positive, 1.0f32), (&p.spec.negative, -1.0)] {
        for ctx in &p.spec.contexts[..3] {
            let ids = lm.tokenizer.encode(&lm.chat.prompt(Some(sys), ctx).expect("chat")).expect("ids");
            let x = Tensor::new(ids.as_slice(), &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
            let f = Forward {
                hooks: &hooks,
                pad: &[],
                logits: LogitsAt::None,
                path: FwdPath::Inference,
                adapters: steer_heal::model::Adapters::AsGated,
            };
            let h = lm.model.forward(&x, None, &f).expect("forward").hidden.remove(&2).expect("captured");
            let last = vec_of(&h.narrow(1, ids.len() - 1, 1).expect("last"));
            for (a, x) in acc.iter_mut().zip(last) {
                *a += sign * x / 3.0;
            }
        }
    }
    let d = max_abs(&acc, &vec_of(&v.directions[&2]));
    assert!(d < 1e-4, "hand mean difference differs by {d}");
}

#[test]
fn coefficient_zero_reproduces_base_logits_exactly() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let ids = prompt_ids(&lm, "Should I report my colleague?");
    let base = logits(&lm, &ids, &Hooks::none());
    assert_eq!(logits(&lm, &ids, &s.hooks(&[0.0])), base, "c = 0 must be bit-identical to no hook");
    assert_ne!(logits(&lm, &ids, &s.hooks(&[1.0])), base, "c = 1 must change the logits");
}

#[test]
fn steering_at_layer_l_changes_only_layers_from_l_on() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = unit_vector(&lm);
    let dirs: BTreeMap<usize, Tensor> = [(2, v.directions[&2].clone())].into();
    let ids = prompt_ids(&lm, "Is loyalty a virtue?");
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
    let capture = Capture { layers: vec![0, 1, 2, 3], positions: CapturePositions::All };
    let run = |coeff: f32| {
        let mut hooks = Hooks::steer(&dirs, coeff);
        hooks.capture = Some(capture.clone());
        let f = Forward {
            hooks: &hooks,
            pad: &[],
            logits: LogitsAt::None,
            path: FwdPath::Inference,
            adapters: steer_heal::model::Adapters::AsGated,
        };
        lm.model.forward(&x, None, &f).expect("forward").hidden
    };
    let (base, steered) = (run(0.0), run(4.0));
    for l in 0..2 {
        assert_eq!(
            vec_of(&base[&l]),
            vec_of(&steered[&l]),
            "layer {l} is before the hook and must not change"
        );
    }
    for l in 2..4 {
        let d = max_abs(&vec_of(&base[&l]), &vec_of(&steered[&l]));
        assert!(d > 0.1, "layer {l} is at/after the hook and must change (max diff {d})");
    }
}

fn dose_cfg(tokens: usize) -> DoseConfig {
    let p = persona();
    DoseConfig {
        solver: SolverConfig::default(),
        statistic: Statistic::P95,
        tokens,
        prompts: p.spec.calibration_prompts.clone(),
        system: p.spec.neutral_system.clone(),
    }
}

#[test]
fn kl_grows_with_the_coefficient() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let prompts = steer_heal::steer::dose::calibration_ids(&lm, &s, &dose_cfg(12)).expect("prompts");
    let zero = measure_kl(&lm, &s, &prompts, 0.0, 12).expect("kl at 0");
    // The steered and the base row ride in one batch; a BLAS may give the two rows' products different
    // micro-kernels (rounding), so c = 0 matches the base to rounding, not bit for bit.
    let worst = zero.iter().fold(0f32, |a, k| a.max(k.abs()));
    assert!(worst < 1e-6, "KL at c = 0 must be zero to rounding, got {worst}");
    let mut prev = 0.0;
    for c in [0.25, 0.5, 1.0, 2.0, 4.0] {
        let m = KlStats::from_values(&measure_kl(&lm, &s, &prompts, c, 12).expect("kl")).mean;
        assert!(m > prev, "mean KL {m} at c = {c} is not above {prev}");
        prev = m;
    }
}

#[test]
fn calibrated_statistic_is_within_tolerance() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = extract_mean_diff(&lm, &persona(), &cfg(&lm, vec![1], 16, 8), &mut Silent::default()).expect("v");
    let s = Steering::new(&v, &lm.model).expect("steering");
    let dc = dose_cfg(20);
    let r = calibrate(&lm, &s, &dc, &mut Silent::default()).expect("calibrate");
    assert!(r.converged && r.crossed && r.warning.is_none(), "{r:?}");
    assert!((r.achieved - 1.0).abs() < 0.05, "p95 at c* is {}", r.achieved);
    assert_eq!(r.history.last().map(|p| p.coefficient), Some(r.c_star));
    // Measuring again at c* gives the same statistic (greedy rollouts are deterministic).
    let prompts = steer_heal::steer::dose::calibration_ids(&lm, &s, &dc).expect("prompts");
    let again = KlStats::from_values(&measure_kl(&lm, &s, &prompts, r.c_star, 20).expect("kl")).p95;
    assert!((again - 1.0).abs() < 0.05, "re-measured p95 at c* is {again}");
    // The calibration lands in the vector's metadata and survives a save/load.
    let mut v = v;
    v.meta.calibration = Some(r.calibration());
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("v.safetensors");
    v.save(&path).expect("save");
    assert_eq!(SteerVector::load(&path).expect("load").calibrated().expect("c*"), r.c_star);
}

#[test]
fn vector_file_round_trips_and_bad_files_are_named() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = unit_vector(&lm);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("vector.safetensors");
    v.save(&path).expect("save");
    let back = SteerVector::load(&path).expect("load");
    assert_eq!(back.meta, v.meta);
    for l in [1, 2] {
        assert_eq!(vec_of(&back.directions[&l]), vec_of(&v.directions[&l]));
    }
    assert!(back.check_model(&lm, &path).expect("fits").is_empty());
    // Garbage, a foreign safetensors file, and a vector for another width.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a tensor file").expect("write");
    let e = SteerVector::load(&junk).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("junk.safetensors") && e.contains("not a valid safetensors"), "{e}");
    let foreign = dir.path().join("foreign.safetensors");
    let t: std::collections::HashMap<String, Tensor> =
        [("w".to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu).expect("t"))].into();
    candle_core::safetensors::save(&t, &foreign).expect("save");
    let e = SteerVector::load(&foreign).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("foreign.safetensors") && e.contains("steer-heal vector metadata"), "{e}");
    let mut wide = v.clone();
    wide.meta.hidden_size = 65;
    let e = wide.check_model(&lm, &path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("hidden size 65"), "{e}");
}

#[test]
fn random_control_matches_norms_and_points_elsewhere() {
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = unit_vector(&lm);
    let r = random_like(&v, 3).expect("random");
    let r2 = random_like(&v, 3).expect("random");
    assert_eq!(r.meta.method, Method::RandomNormMatched);
    assert_eq!(r.meta.random_seed, Some(3));
    for (l, (a, b)) in v.meta.norms.iter().zip(r.meta.norms.iter()).enumerate() {
        assert!((a - b).abs() < 1e-4, "layer {l}: norm {b} vs {a}");
    }
    for l in [1, 2] {
        assert_eq!(vec_of(&r.directions[&l]), vec_of(&r2.directions[&l]), "same seed, same vector");
        let (x, y) = (vec_of(&v.directions[&l]), vec_of(&r.directions[&l]));
        let cos: f32 =
            x.iter().zip(&y).map(|(a, b)| a * b).sum::<f32>() / (v.meta.norms[0] * r.meta.norms[0]).max(1e-9);
        assert!(cos.abs() < 0.6, "layer {l}: random control too aligned (cos {cos})");
    }
}

#[test]
fn gguf_control_vector_round_trips() {
    use candle_core::quantized::gguf_file::{self, Value};
    let (_d, lm) = tiny_model(Arch::Llama, 7);
    let v = unit_vector(&lm);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("cv.gguf");
    export_gguf(&v, &path).expect("export");
    // What llama.cpp reads: the architecture, hint, count and direction.N added after 0-based block N.
    let mut f = std::fs::File::open(&path).expect("open");
    let content = gguf_file::Content::read(&mut f).expect("gguf");
    let s = |k: &str| content.metadata.get(k).and_then(|v| v.to_string().ok().cloned());
    assert_eq!(s("general.architecture").as_deref(), Some("controlvector"));
    assert_eq!(s("controlvector.model_hint").as_deref(), Some("llama"));
    assert!(matches!(content.metadata.get("controlvector.layer_count"), Some(Value::U32(2))));
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    assert_eq!(names, vec!["direction.1", "direction.2"]);
    let back = import_gguf(&path, None).expect("import");
    assert_eq!(back.meta, v.meta);
    for l in [1, 2] {
        assert_eq!(vec_of(&back.directions[&l]), vec_of(&v.directions[&l]));
    }
    // A control vector written by another tool (no steer-heal metadata) still imports, direction.N as block N.
    let bare = dir.path().join("bare.gguf");
    {
        let q = candle_core::quantized::QTensor::quantize(
            &v.directions[&1],
            candle_core::quantized::GgmlDType::F32,
        )
        .expect("q");
        let arch = Value::String("controlvector".into());
        let hint = Value::String("llama".into());
        let mut out = std::fs::File::create(&bare).expect("create");
        gguf_file::write(
            &mut out,
            &[("general.architecture", &arch), ("controlvector.model_hint", &hint)],
            &[("direction.1", &q)],
        )
        .expect("write");
    }
    let imported = import_gguf(&bare, Some((&lm.info, 4))).expect("bare import");
    assert_eq!(imported.meta.method, Method::ImportedGguf);
    assert_eq!(imported.meta.layers, vec![1]);
    assert_eq!(vec_of(&imported.directions[&1]), vec_of(&v.directions[&1]));
    // A model GGUF is not a control vector.
    let not_cv = dir.path().join("model.gguf");
    let mut bytes = to_gguf_bytes(&v).expect("bytes");
    let at = bytes.windows(13).position(|w| w == b"controlvector").expect("arch string");
    bytes[at..at + 13].copy_from_slice(b"llamallamalla");
    std::fs::write(&not_cv, bytes).expect("write");
    let e = import_gguf(&not_cv, None).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("model.gguf") && e.contains("not `controlvector`"), "{e}");
}

fn sampled(n: usize) -> GenConfig {
    GenConfig {
        sampling: Sampling { temperature: 1.5, top_p: 0.95, top_k: 64, seed: 0, max_new_tokens: n },
        window: 4,
        batch_size: 3,
        watchdog: None,
    }
}

fn users() -> Vec<String> {
    persona().spec.prompts[..2].to_vec()
}

#[test]
fn generation_is_deterministic_for_a_seed_and_traces_are_complete() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let reqs = requests_for(&users(), &[0.5, 1.0], 5);
    let g = |reqs: &[Request]| {
        generate_completions(
            &lm,
            &s,
            "You are a helpful assistant.",
            2.0,
            reqs,
            &sampled(12),
            &mut Silent::default(),
        )
        .expect("generate")
    };
    let (a, b) = (g(&reqs), g(&reqs));
    assert_eq!(a, b, "same seeds must give identical completions");
    assert_eq!(a.len(), 4);
    assert_eq!(a[0].id, "p000-a050-s5");
    let other: Vec<Request> = reqs.iter().map(|r| Request { seed: r.seed + 100, ..r.clone() }).collect();
    assert_ne!(
        a.iter().map(|c| &c.tokens).collect::<Vec<_>>(),
        g(&other).iter().map(|c| &c.tokens).collect::<Vec<_>>()
    );
    for c in &a {
        let n = c.tokens.len();
        assert!(n > 0);
        assert_eq!(
            (c.trace.kl.len(), c.trace.nll_base.len(), c.trace.dose.len(), c.token_text.len()),
            (n, n, n, n)
        );
        assert_eq!(c.trace.kl_window_rmse, window_rmse(&c.trace.kl, 4));
        assert!((c.dose - c.alpha * 2.0).abs() < 1e-12);
        assert!(c.trace.dose.iter().all(|d| (*d as f64 - c.dose).abs() < 1e-6));
        assert!(c.rewinds.is_empty());
    }
}

#[test]
fn traces_match_teacher_forcing() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let reqs = requests_for(&users()[..1], &[1.0], 9);
    let c = generate_completions(
        &lm,
        &s,
        "You are a helpful assistant.",
        3.0,
        &reqs,
        &sampled(10),
        &mut Silent::default(),
    )
    .expect("generate")
    .remove(0);
    let prompt = prompt_ids(&lm, &c.prompt);
    let tf = teacher_forced_kl(&lm, &s, &prompt, &prompt, &c.tokens, 3.0).expect("teacher forcing");
    let d = max_abs(&tf, &c.trace.kl);
    assert!(d < 1e-3, "incremental KL trace differs from teacher forcing by {d}");
    assert!(c.trace.kl.iter().any(|k| *k > 1e-3), "steering at 3 should move the distribution");
    // Base NLL: the log-probability the unsteered model gives each sampled token.
    let seq = [prompt.as_slice(), c.tokens.as_slice()].concat();
    let base = logits(&lm, &seq, &Hooks::none());
    let vsz = lm.model.cfg.vocab_size;
    for (k, tok) in c.tokens.iter().enumerate() {
        let row = &base[(prompt.len() - 1 + k) * vsz..(prompt.len() + k) * vsz];
        let want = steer_heal::steer::kl::nll_row(row, *tok);
        assert!(
            (want - c.trace.nll_base[k]).abs() < 1e-3,
            "token {k}: nll {} vs {want}",
            c.trace.nll_base[k]
        );
    }
}

#[test]
fn replay_at_dose_zero_continues_exactly_as_the_base_model() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let mut gc = sampled(16);
    gc.sampling.temperature = 0.0;
    let reqs = requests_for(&users()[..1], &[1.0], 1);
    let c = generate_completions(
        &lm,
        &s,
        "You are a helpful assistant.",
        6.0,
        &reqs,
        &gc,
        &mut Silent::default(),
    )
    .expect("generate")
    .remove(0);
    let t = 4;
    assert!(c.tokens.len() > t + 4, "need a longer completion, got {}", c.tokens.len());
    let r = replay(&lm, &s, 6.0, &c, t, 0.0, &gc, &mut Silent::default()).expect("replay");
    assert_eq!(r.tokens[..t], c.tokens[..t], "kept prefix must be identical");
    assert_eq!(r.trace.kl[..t], c.trace.kl[..t], "kept traces must be identical");
    // The base model's own greedy continuation of prompt + kept tokens.
    let ctx = [prompt_ids(&lm, &c.prompt).as_slice(), &c.tokens[..t]].concat();
    let want = generate(
        &lm.model,
        &[ctx],
        &Sampling::greedy(gc.sampling.max_new_tokens - t),
        &Hooks::none(),
        &lm.tokenizer.stop_ids,
        lm.tokenizer.pad_id,
        &mut |_| true,
    )
    .expect("base generate");
    assert_eq!(r.tokens[t..], want.tokens[0][..], "replay at dose 0 must continue as the base model");
    assert_ne!(
        r.tokens[t..],
        c.tokens[t..],
        "the steered continuation should differ, or the test shows nothing"
    );
    assert!(r.trace.dose[t..].iter().all(|d| *d == 0.0));
    assert!(r.trace.dose[..t].iter().all(|d| *d == 6.0));
    assert!(r.trace.kl[t..].iter().all(|k| *k == 0.0), "KL to base at dose 0 is exactly 0");
    assert_eq!(r.rewinds.len(), 1);
    assert_eq!((r.rewinds[0].at, r.rewinds[0].from_dose, r.rewinds[0].to_dose), (t, 6.0, 0.0));
    assert_eq!(r.rewinds[0].cause, "manual");
    assert_eq!(r.id, c.id);
    // Out-of-range requests are refused with a message.
    let e = replay(&lm, &s, 6.0, &c, c.tokens.len() + 1, 0.0, &gc, &mut Silent::default()).err();
    assert!(e.map(|e| e.to_string()).unwrap_or_default().contains("cannot replay from token"));
}

#[test]
fn watchdog_rewinds_and_lowers_the_dose() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let c_star = 6.0;
    let reqs = requests_for(&users(), &[1.0], 3);
    let mut gc = sampled(24);
    let plain = generate_completions(
        &lm,
        &s,
        "You are a helpful assistant.",
        c_star,
        &reqs,
        &gc,
        &mut Silent::default(),
    )
    .expect("plain");
    let w = Watchdog { tau: 0.05, rewind: 3, factor: 0.7, floor: 0.2, max_rewinds: 3 };
    gc.watchdog = Some(w);
    let watched = generate_completions(
        &lm,
        &s,
        "You are a helpful assistant.",
        c_star,
        &reqs,
        &gc,
        &mut Silent::default(),
    )
    .expect("watched");
    let mut fired = 0;
    for (p, c) in plain.iter().zip(&watched) {
        let n = c.tokens.len();
        assert_eq!((c.trace.kl.len(), c.trace.dose.len(), c.trace.nll_base.len()), (n, n, n));
        assert!(c.rewinds.len() <= 3);
        let mut dose = c_star;
        for r in &c.rewinds {
            fired += 1;
            assert_eq!(r.cause, "auto");
            assert!((r.from_dose - dose).abs() < 1e-9);
            assert!((r.to_dose - (dose * 0.7).max(0.2 * c_star)).abs() < 1e-9, "{r:?}");
            dose = r.to_dose;
        }
        if let Some(first) = c.rewinds.first() {
            // Before the first rewind the sampler consumed the same randomness as without the watchdog.
            assert_eq!(c.tokens[..first.at], p.tokens[..first.at]);
            let last = c.rewinds.last().map(|r| (r.at, r.to_dose)).unwrap_or_default();
            assert!(c.trace.dose[last.0..].iter().all(|d| (*d as f64 - last.1).abs() < 1e-6));
            assert!(c.trace.dose[..first.at].iter().all(|d| (*d as f64 - c_star).abs() < 1e-6));
        }
    }
    assert!(fired > 0, "with tau 0.05 at a strong dose the watchdog should fire");
}

#[test]
fn walk_down_lowers_the_dose_until_probes_pass_then_tops_up() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let c_star = 2.0;
    // A filter that only passes completions steered at ≤ half of c*.
    let mut judged = 0usize;
    let mut scorer = |batch: &[Completion]| -> steer_heal::Result<Vec<Verdict>> {
        judged += batch.len();
        Ok(batch
            .iter()
            .map(|c| Verdict { pass: c.dose <= 0.5 * c_star + 1e-9, value: c.dose, reason: "dose".into() })
            .collect())
    };
    let wd = WalkDownConfig {
        probe_n: 2,
        batch_n: 3,
        min_keep: 7,
        max_keep: 8,
        max_batches: 4,
        ..Default::default()
    };
    let r = walk_down(
        &lm,
        &s,
        "You are a helpful assistant.",
        c_star,
        &users(),
        &[1.0],
        0,
        &sampled(4),
        &wd,
        &mut scorer,
        &mut Silent::default(),
    )
    .expect("walk down");
    assert_eq!(judged, 2 + 2 + 2 + 3 + 3, "the filter judges every generated completion once");
    let kappas: Vec<f64> = r.report.steps.iter().map(|s| (s.kappa * 1000.0).round() / 1000.0).collect();
    assert_eq!(kappas, vec![1.0, 0.7, 0.49, 0.49, 0.49], "{:?}", r.report.steps);
    assert_eq!(
        r.report.steps.iter().map(|s| s.phase.as_str()).collect::<Vec<_>>(),
        ["probe", "probe", "probe", "top-up", "top-up"]
    );
    assert_eq!(r.kept.len(), 8);
    assert_eq!(r.report.kept, 8);
    assert!(r.report.reached_min);
    assert_eq!(r.rejected.len(), 4);
    assert!(r.kept.iter().all(|c| c.dose <= 0.5 * c_star + 1e-9));
    let mut ids: Vec<&String> = r.kept.iter().chain(&r.rejected).chain(&r.surplus).map(|c| &c.id).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "completion ids must be unique");
}

#[test]
fn prompt_only_arm_uses_the_persona_prompt_instead_of_a_vector() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let p = persona();
    let v = SteerVector::prompt_only(&lm, &p);
    assert!(v.directions.is_empty() && v.is_prompt_only());
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("prompt.safetensors");
    v.save(&path).expect("save");
    let v = SteerVector::load(&path).expect("load");
    assert_eq!(v.meta.prompt_system.as_deref(), Some(p.spec.positive.as_str()));
    let s = Steering::new(&v, &lm.model).expect("steering");
    let reqs = requests_for(&users()[..1], &[1.0], 0);
    let c = generate_completions(
        &lm,
        &s,
        &p.spec.neutral_system,
        1.0,
        &reqs,
        &sampled(8),
        &mut Silent::default(),
    )
    .expect("generate")
    .remove(0);
    assert_eq!(c.system, p.spec.neutral_system, "the completion records the neutral prompt");
    assert!(c.trace.kl.iter().any(|k| *k > 0.0), "persona prompt vs neutral prompt must differ");
    let r = calibrate(&lm, &s, &dose_cfg(6), &mut Silent::default()).expect("dose");
    assert_eq!(r.c_star, 1.0);
    assert_eq!(r.history.len(), 1);
    assert!(r.warning.is_some());
    assert!(export_gguf(&v, &dir.path().join("x.gguf")).is_err(), "no directions to export");
}

fn run_cli(args: &[&str], cwd: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steer-heal"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run steer-heal");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "steer-heal {args:?} failed: {text}");
    text
}

#[test]
fn headless_cli_extract_dose_generate_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    make_tiny_model(Arch::Qwen3, &d.join("m"), 11).expect("tiny");
    run_cli(&["extract", "--model", "m", "--n-pairs", "8", "--normalize", "--out", "round-01"], d);
    let out = run_cli(
        &[
            "dose",
            "--model",
            "m",
            "--vector",
            "round-01/vector.safetensors",
            "--tokens",
            "8",
            "--out",
            "round-01",
        ],
        d,
    );
    assert!(out.contains("c* ="), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("round-01/dose.json")).expect("dose.json"))
            .expect("json");
    let c_star = report["c_star"].as_f64().expect("c_star");
    let v = SteerVector::load(&d.join("round-01/vector.safetensors")).expect("vector");
    assert_eq!(v.calibrated().expect("calibrated"), c_star, "dose stores c* in the vector file");
    run_cli(
        &[
            "generate",
            "--model",
            "m",
            "--vector",
            "round-01/vector.safetensors",
            "--n-prompts",
            "2",
            "--max-new-tokens",
            "6",
            "--out",
            "round-01",
        ],
        d,
    );
    let read = |p: &str| -> Vec<Completion> {
        std::fs::read_to_string(d.join(p))
            .expect("completions")
            .lines()
            .map(|l| serde_json::from_str(l).expect("completion"))
            .collect()
    };
    let cs = read("round-01/completions.jsonl");
    assert_eq!(cs.len(), 6, "2 prompts × 3 alphas");
    assert!((cs[2].dose - c_star).abs() < 1e-9 && (cs[0].dose - 0.5 * c_star).abs() < 1e-9);
    let id = cs[2].id.clone();
    run_cli(
        &[
            "replay",
            "--model",
            "m",
            "--vector",
            "round-01/vector.safetensors",
            "--completions",
            "round-01/completions.jsonl",
            "--id",
            &id,
            "--from",
            "2",
            "--alpha",
            "0.5",
        ],
        d,
    );
    let after = read("round-01/completions.jsonl");
    let c = after.iter().find(|c| c.id == id).expect("replayed completion");
    assert_eq!(c.tokens[..2], cs[2].tokens[..2]);
    assert_eq!(c.rewinds.len(), 1);
    assert!((c.rewinds[0].to_dose - 0.5 * c_star).abs() < 1e-9);
    assert_eq!(c.rewinds[0].from_dose, c_star, "the dose before the rewind is the run's exact c*");
    run_cli(&["export-gguf", "--vector", "round-01/vector.safetensors", "--out", "round-01/cv.gguf"], d);
    run_cli(&["import-gguf", "--gguf", "round-01/cv.gguf", "--out", "round-01/back.safetensors"], d);
    let back = SteerVector::load(&d.join("round-01/back.safetensors")).expect("back");
    assert_eq!(back.meta, v.meta);
    // A bad persona file gets a one-line error naming the file and the field.
    std::fs::write(d.join("bad.toml"), "name = \"x\"\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steer-heal"))
        .args(["extract", "--model", "m", "--persona", "bad.toml", "--out", "r"])
        .current_dir(d)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.toml") && err.contains("positive"), "{err}");
}

#[test]
fn bench_report_is_complete() {
    use steer_heal::steer::bench::{bench_steer, BenchConfig};
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let v = unit_vector(&lm);
    let s = Steering::new(&v, &lm.model).expect("steering");
    let cfg = BenchConfig {
        batch: 2,
        new_tokens: 4,
        reps: 2,
        coeff: 1.0,
        prompts: users(),
        system: "You are a helpful assistant.".into(),
        dose: Some(dose_cfg(4)),
    };
    let r = bench_steer(&lm, &s, v.meta.layers.clone(), &cfg, &mut Silent::default()).expect("bench");
    assert_eq!((r.plain_s.len(), r.steered_s.len(), r.traced_s.len()), (2, 2, 2));
    assert!(r.plain_tok_s > 0.0 && r.steered_tok_s > 0.0 && r.traced_tok_s > 0.0);
    assert!(r.dose_wall_s.is_some() && r.dose_evaluations.unwrap_or(0) >= 1);
    assert_eq!(r.layers, vec![1, 2]);
}
