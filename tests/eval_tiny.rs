//! tinymfv eval on tiny random models: the answer-token check, the rendered protocol, batched+cached scoring
//! against a flat unbatched recomputation, eval.json round-trips, the answer cases, the progress map files and
//! gate-q2.md, and the `eval` / `plot` subcommands.
//!
//! The tiny byte-level tokenizer encodes every word as bytes, so `social`/`sanctity` share `s` and
//! `loyalty`/`liberty` share `l`: the seven-way readout is impossible and the eval refuses it. The scoring tests
//! therefore use a test tokenizer that adds the seven answer words as tokens (and a model sized to it).

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use steer_heal::eval::data::{select_items, Condition, Variant, FOUNDATIONS};
use steer_heal::eval::protocol::{
    answer_token_ids, frame_tokens, read_think, AnswerCase, FrameOrder, SuffixRendering, PREFILL, THINK_CLOSE,
};
use steer_heal::eval::{
    compute_metrics, gate_q2, load_rounds, run_eval, write_gate_q2, write_progress_map, EvalConfig,
    EvalModel, EvalReport, GateQ2Spec, Interval, RoundPoint, RoundStatus, Stat,
};
use steer_heal::model::generate::log_softmax;
use steer_heal::model::tiny::{make_tiny_model, random_weights};
use steer_heal::model::{
    load_model, Arch, Forward, Hooks, LoadedModel, LogitsAt, ModelConfig, Path as FwdPath,
};
use steer_heal::progress::Silent;
use tokenizers::{AddedToken, Tokenizer};

const ONE: SuffixRendering = SuffixRendering::OneConversation;

/// A tiny model whose tokenizer has the seven answer words as tokens, with room for the long json probes.
fn tiny_with_answer_words(arch: Arch, dir: &Path) -> LoadedModel {
    make_tiny_model(arch, dir, 7).expect("tiny model");
    let tp = dir.join("tokenizer.json");
    let mut tok = Tokenizer::from_file(&tp).expect("tokenizer");
    let words: Vec<AddedToken> = FOUNDATIONS.iter().map(|f| AddedToken::from(f.word(), false)).collect();
    tok.add_tokens(words).expect("add answer words");
    tok.save(&tp, true).expect("save tokenizer");
    let cp = dir.join("config.json");
    let mut cfg = ModelConfig::from_hf_json(&cp).expect("config");
    cfg.vocab_size = tok.get_vocab_size(true);
    cfg.max_position_embeddings = 4096;
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cp).expect("read")).expect("json");
    v["vocab_size"] = cfg.vocab_size.into();
    v["max_position_embeddings"] = cfg.max_position_embeddings.into();
    std::fs::write(&cp, serde_json::to_string_pretty(&v).expect("json")).expect("write config");
    let w = random_weights(&cfg, 11).expect("weights");
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).expect("save weights");
    load_model(dir, Some(DType::F32), &Device::Cpu).expect("load")
}

#[test]
fn plain_tiny_tokenizer_is_refused_with_a_clear_error() {
    let d = tempfile::tempdir().expect("tmp");
    make_tiny_model(Arch::Llama, d.path(), 7).expect("tiny");
    // The byte-level tokenizer without the answer words the fixture adds.
    let plain = steer_heal::model::tiny::tiny_tokenizer(Arch::Llama).expect("tokenizer");
    plain.save(d.path().join("tokenizer.json"), true).expect("save");
    let lm = load_model(d.path(), Some(DType::F32), &Device::Cpu).expect("load");
    let err = answer_token_ids(&lm.tokenizer).expect_err("byte tokens collide").to_string();
    assert!(err.contains("`sanctity` and `social` both start with token"), "{err}");
    assert!(err.contains("`loyalty` and `liberty`"), "{err}");
}

#[test]
fn answer_words_have_distinct_first_tokens_on_the_test_tokenizer() {
    let d = tempfile::tempdir().expect("tmp");
    let lm = tiny_with_answer_words(Arch::Llama, d.path());
    let ids = answer_token_ids(&lm.tokenizer).expect("distinct");
    for (f, id) in FOUNDATIONS.iter().zip(ids) {
        assert_eq!(lm.tokenizer.token_str(id), f.word());
    }
    let mut sorted = ids.to_vec();
    sorted.dedup();
    assert_eq!(sorted.len(), 7);
}

#[test]
fn suffix_closes_the_think_and_prefills_the_answer_in_each_family_template() {
    for (arch, want) in [
        (Arch::Llama, "</think><|im_end|>\n<|im_start|>user\nJust answer<|im_end|>\n<|im_start|>assistant\n"),
        (
            Arch::Gemma3,
            "</think><end_of_turn>\n<start_of_turn>user\nJust answer<end_of_turn>\n<start_of_turn>model\n",
        ),
    ] {
        let d = tempfile::tempdir().expect("tmp");
        let lm = tiny_with_answer_words(arch, d.path());
        let ft = frame_tokens(
            &lm.chat,
            &lm.tokenizer,
            None,
            "You see a man kick a dog.",
            FrameOrder::Reversed,
            ONE,
        )
        .expect("frame");
        let suffix = lm.tokenizer.decode(&ft.suffix, true).expect("decode");
        assert_eq!(suffix, format!("{want}{PREFILL}"), "{arch:?}");
        let prefill = lm.tokenizer.decode(&ft.suffix[ft.prefill_start..], true).expect("decode");
        assert_eq!(prefill, PREFILL);
        let prompt = lm.tokenizer.decode(&ft.prompt, true).expect("decode");
        assert!(prompt.ends_with("<think>\n"), "{prompt}");
        assert!(prompt.contains("You see a man kick a dog.\n\nThis is wrong because:\n"));
        assert!(!suffix.contains("<bos>"), "no second BOS in the middle of the chat");
        // A system prompt (prompt-only control arm) goes into the prompt and leaves the suffix as it was.
        let sys = "You are a careful judge.";
        let with_sys = frame_tokens(
            &lm.chat,
            &lm.tokenizer,
            Some(sys),
            "You see a man kick a dog.",
            FrameOrder::Reversed,
            ONE,
        )
        .expect("frame");
        assert!(lm.tokenizer.decode(&with_sys.prompt, true).expect("decode").contains(sys));
        assert_eq!(with_sys.suffix, ft.suffix);
    }
}

/// Upstream tinymfv closes the think with the assistant-close marker and renders "Just answer" as a fresh
/// conversation: whatever a template puts at the start of a chat (a BOS, a default system prompt) comes again.
#[test]
fn upstream_suffix_renders_the_nudge_as_a_separate_conversation() {
    for (arch, close, fresh_start, nudge) in [
        (
            Arch::Llama,
            "<|im_end|>\n",
            // The tiny template has no default system prompt (SmolLM2's has: see the SmolLM2 eval test).
            "",
            "<|im_start|>user\nJust answer<|im_end|>\n<|im_start|>assistant\n",
        ),
        (
            Arch::Gemma3,
            "<end_of_turn>\n",
            "<bos>",
            "<start_of_turn>user\nJust answer<end_of_turn>\n<start_of_turn>model\n",
        ),
    ] {
        let d = tempfile::tempdir().expect("tmp");
        let lm = tiny_with_answer_words(arch, d.path());
        let text = "You see a man kick a dog.";
        let up =
            frame_tokens(&lm.chat, &lm.tokenizer, None, text, FrameOrder::Forward, SuffixRendering::Upstream)
                .expect("frame");
        let one = frame_tokens(&lm.chat, &lm.tokenizer, None, text, FrameOrder::Forward, ONE).expect("frame");
        let suffix = lm.tokenizer.decode(&up.suffix, true).expect("decode");
        assert!(suffix.starts_with(&format!("</think>{close}{fresh_start}")), "{arch:?}: {suffix}");
        assert!(suffix.ends_with(&format!("{nudge}{PREFILL}")), "{arch:?}: {suffix}");
        assert_eq!(lm.tokenizer.decode(&up.suffix[up.prefill_start..], true).expect("decode"), PREFILL);
        assert_eq!(up.prompt, one.prompt, "only the suffix differs");
    }
}

#[test]
fn think_traces_are_classified_as_the_reference_does() {
    let d = tempfile::tempdir().expect("tmp");
    let lm = tiny_with_answer_words(Arch::Llama, d.path());
    let tok = &lm.tokenizer;
    let enc = |s: &str| tok.encode(s).expect("encode");
    let plain = read_think(tok, &enc("Hmm, the man is rude to the dog")).expect("read");
    assert_eq!(plain.case, AnswerCase::Interrupted);
    let closed =
        read_think(tok, &enc(&format!("It hurts the dog.{THINK_CLOSE} The answer is care"))).expect("read");
    assert_eq!(closed.case, AnswerCase::AnsweredElsewhere);
    assert!(closed.emitted_close);
    let text = format!("Done.{THINK_CLOSE}\n{PREFILL}care\"}}");
    let ids = enc(&text);
    let natural = read_think(tok, &ids).expect("read");
    assert_eq!(natural.case, AnswerCase::Natural, "the prefill wins over the close");
    let span = natural.natural.expect("span");
    assert!(tok.decode(&ids[..span.slot], true).expect("d").ends_with(PREFILL));
    assert_eq!(tok.token_str(ids[span.slot]), "care");
    assert!(tok.decode(&ids[span.start..span.slot], true).expect("d").contains(PREFILL));
}

/// Greedy think + forced suffix for one frame with plain full forwards (no cache, no batch, no padding).
fn flat_reference(
    lm: &LoadedModel,
    prompt: &[u32],
    suffix: &[u32],
    think: usize,
    ids: &[u32; 7],
) -> [f64; 7] {
    let hooks = Hooks::none();
    let f = Forward {
        hooks: &hooks,
        pad: &[],
        logits: LogitsAt::All,
        path: FwdPath::Inference,
        adapters: steer_heal::model::Adapters::AsGated,
    };
    let run = |seq: &[u32]| -> Vec<Vec<f32>> {
        let x = Tensor::new(seq, &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
        let l = lm.model.forward(&x, None, &f).expect("fwd").logits.expect("logits");
        l.squeeze(0).expect("sq").to_vec2().expect("vec")
    };
    let mut seq = prompt.to_vec();
    for _ in 0..think {
        let last = run(&seq).pop().expect("last");
        let mut best = 0usize;
        for (i, x) in last.iter().enumerate() {
            if !lm.tokenizer.stop_ids.contains(&(i as u32))
                && (*x > last[best] || lm.tokenizer.stop_ids.contains(&(best as u32)))
            {
                best = i;
            }
        }
        seq.push(best as u32);
    }
    seq.extend_from_slice(suffix);
    let lp = log_softmax(run(&seq).last().expect("last"));
    ids.map(|id| lp[id as usize] as f64)
}

#[test]
fn batched_cached_eval_matches_flat_scoring_and_eval_json_round_trips() {
    let d = tempfile::tempdir().expect("tmp");
    let lm = tiny_with_answer_words(Arch::Llama, d.path());
    let hooks = Hooks::none();
    let cfg = EvalConfig {
        n_vignettes: Some(4),
        think_tokens: 8,
        batch_size: 3,
        json_probe_max_tokens: 6,
        ..EvalConfig::default()
    };
    let report = run_eval(&EvalModel::from_loaded(&lm, &hooks), &cfg, &mut Silent::default()).expect("eval");
    let m = &report.metrics;
    assert_eq!(m.n_rows, 4);
    assert_eq!(report.rows.len(), 4);
    assert_eq!(m.cases.natural + m.cases.interrupted + m.cases.answered_elsewhere, 8);
    assert!(m.p_ans_any > 0.0 && m.p_ans_any <= 1.0, "{}", m.p_ans_any);
    for x in [m.authority, m.care, m.ppx_json, m.p_ans_any, m.top1_acc, m.mean_soft_nll] {
        assert!(x.is_finite(), "{m:?}");
    }
    assert!(m.ppx_json > 1.0);
    let jv = m.json_is_valid.expect("probe ran");
    assert!((0.0..=1.0).contains(&jv));
    assert_eq!(report.json_probe.as_ref().expect("probe").outputs.len(), 3);

    // Every frame against an independent flat recomputation (batch of 3 mixes prompt lengths → left padding).
    let items = select_items(Variant::Classic, &[Condition::OtherViolate], Some(4)).expect("items");
    let ids = report.answer_token_ids;
    for (row, item) in report.rows.iter().zip(&items) {
        assert_eq!(row.id, item.id);
        for frame in &row.frames {
            let ft =
                frame_tokens(&lm.chat, &lm.tokenizer, None, &item.text, frame.order, ONE).expect("frame");
            if frame.case != AnswerCase::Interrupted {
                continue;
            }
            let want = flat_reference(&lm, &ft.prompt, &ft.suffix, 8, &ids);
            for (k, (got, flat)) in frame.lp.iter().zip(want).enumerate() {
                assert!((got - flat).abs() < 2e-3, "{} {:?} {k}: {got} vs {flat}", row.id, frame.order);
            }
            let pm: f64 = want.iter().map(|x| x.exp()).sum();
            assert!((frame.pmass - pm).abs() < 1e-4);
        }
    }
    assert!(m.cases.interrupted > 0, "a random tiny model does not close its think in 8 tokens");

    let out = d.path().join("out");
    let path = report.save(&out).expect("save");
    let back = EvalReport::load(&path).expect("load");
    assert_eq!(back.rows.len(), report.rows.len());
    assert_eq!(back.config, report.config);
    assert_eq!(back.answer_token_ids, report.answer_token_ids);
    let (a, b) = (serde_json::to_value(&back).expect("v"), serde_json::to_value(&report).expect("v"));
    assert_eq!(a, b, "eval.json round-trips");
    let re = back.recompute_metrics();
    assert_eq!(serde_json::to_value(&re).expect("v"), serde_json::to_value(&report.metrics).expect("v"));

    // A corrupt report is refused with the file named.
    std::fs::write(&path, "{\"schema_version\": 1").expect("write");
    let err = EvalReport::load(&path).expect_err("corrupt").to_string();
    assert!(err.contains("eval.json") && err.contains("not a valid eval report"), "{err}");
}

fn sample_rounds() -> Vec<RoundPoint> {
    let iv = |value: f64, half: f64| Interval { value, lo: value - half, hi: value + half, resamples: 2000 };
    let p = |round, status, authority: f64, care: f64, p_ans_any: f64, json: f64, ppx| {
        let mut p = RoundPoint::from_metrics(round, status, &compute_metrics(&[], None));
        (p.authority, p.care, p.p_ans_any, p.json_is_valid, p.ppx_json, p.n) =
            (authority, care, p_ans_any, Some(json), ppx, 132);
        p.kl_spent = Some(0.3 * round as f64);
        p.cos_teacher_r0 = Some(1.0 - 0.05 * round as f64);
        p.cos_student_teacher = Some(0.4);
        p.ci = [
            (Stat::Authority, iv(authority, 0.04)),
            (Stat::Care, iv(care, 0.05)),
            (Stat::PAnsAny, iv(p_ans_any, 0.01)),
        ]
        .into_iter()
        .collect();
        p
    };
    let mut pts = vec![
        p(0, RoundStatus::Base, -2.30, -1.30, 0.99, 1.0, 2.1),
        p(1, RoundStatus::Kept, -2.45, -1.10, 0.98, 1.0, 2.2),
        p(2, RoundStatus::Dropped, -2.60, -0.90, 0.80, 0.33, 4.5),
        p(2, RoundStatus::Kept, -2.55, -1.00, 0.97, 1.0, 2.3),
        p(3, RoundStatus::Kept, -2.70, -0.85, 0.96, 0.67, 2.4),
    ];
    // Paired differences from the previous kept point, each interval below 0.
    for (i, prev, label) in [(1, 0, "base"), (2, 1, "r1"), (3, 1, "r1"), (4, 3, "r2")] {
        let d = pts[i].authority - pts[prev].authority;
        pts[i].vs_prev.insert(Stat::Authority, iv(d, 0.03));
        pts[i].prev = Some(label.into());
    }
    pts
}

#[test]
fn progress_map_png_decodes_and_svg_holds_every_round() {
    let d = tempfile::tempdir().expect("tmp");
    let pts = sample_rounds();
    let (png, svg) = write_progress_map(&pts, 0.95, d.path()).expect("plot");
    let img = image::open(&png).expect("png decodes").to_rgb8();
    assert_eq!(img.dimensions(), (1000, 900));
    let dark = img.pixels().filter(|p| p.0.iter().all(|c| *c < 80)).count();
    assert!(dark > 2000, "axes, markers and text are drawn ({dark} dark pixels)");
    let red = img.pixels().filter(|p| p.0[0] > 180 && p.0[1] < 60 && p.0[2] < 60).count();
    assert!(red > 20, "the dropped round is marked in red ({red} pixels)");
    let svg = std::fs::read_to_string(&svg).expect("svg");
    assert!(svg.starts_with("<svg"));
    // plotters writes each label on its own line inside <text>.
    for label in
        ["base", "r1", "r2", "r3", "r2 (dropped)", "authority = ln p(Authority)", "care = ln p(Care)"]
    {
        assert!(svg.contains(&format!("\n{label}\n</text>")), "svg lacks the label {label}");
    }
    assert!(svg.contains("n = 132 items"));
    // Base + three kept rounds as filled circles on the map, plus coherence markers below.
    assert!(svg.matches("<circle").count() >= 4 + 4 * 3);
    let md = write_gate_q2(d.path(), &pts, &GateQ2Spec::default()).expect("gate");
    let text = std::fs::read_to_string(md).expect("md");
    assert!(text.contains("**Verdict: PASS**"), "{text}");
    assert!(
        text.contains("| 2 | dropped | -2.600 [-2.640, -2.560] | -0.150 [-0.180, -0.120] (vs r1) | — | -0.900 [-0.950, -0.850] |"),
        "{text}"
    );
    assert_eq!(gate_q2::verdict(&pts, &GateQ2Spec::default()).run, 3);
}

/// Each point's 95 % intervals are drawn: authority and care bars on the map, p_ans_any bars in the coherence
/// panel, one legend entry.
#[test]
fn progress_map_draws_the_interval_bars() {
    use steer_heal::eval::plot::progress_svg;
    let with = sample_rounds();
    let mut without = with.clone();
    for p in &mut without {
        p.ci.clear();
    }
    let (a, b) = (progress_svg(&with, 0.9).expect("svg"), progress_svg(&without, 0.9).expect("svg"));
    assert!(a.contains("95 % intervals (bootstrap over vignettes)") && !b.contains("95 % intervals"));
    // The bars are the translucent lines.
    let bars = |svg: &str| svg.matches("<polyline fill=\"none\" opacity=\"0.6\"").count();
    // 5 points × (authority + care) on the map + the legend's sample line + 5 p_ans_any bars.
    assert_eq!((bars(&a), bars(&b)), (5 * 2 + 1 + 5, 0));
}

#[test]
fn eval_and_plot_subcommands_write_their_files() {
    let d = tempfile::tempdir().expect("tmp");
    let model_dir = d.path().join("model");
    tiny_with_answer_words(Arch::Qwen3, &model_dir);
    let bin = env!("CARGO_BIN_EXE_steer-heal");
    let out = d.path().join("eval");
    let o = std::process::Command::new(bin)
        .args(["eval", "--model"])
        .arg(&model_dir)
        .args([
            "--n",
            "2",
            "--think",
            "4",
            "--json-probe-tokens",
            "4",
            "--conditions",
            "other_violate,self_violate",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}{}", stdout, String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("n=4 items"), "{stdout}");
    let r = EvalReport::load(&out).expect("eval.json");
    assert_eq!(r.metrics.n_rows, 4);
    assert_eq!(r.rows[2].condition, Condition::SelfViolate);

    let rounds = d.path().join("rounds.json");
    std::fs::write(
        &rounds,
        serde_json::to_string(&serde_json::json!({"rounds": sample_rounds()})).expect("j"),
    )
    .expect("write");
    assert_eq!(load_rounds(&rounds).expect("rounds").len(), 5);
    let plot_dir = d.path().join("plots");
    let o = std::process::Command::new(bin)
        .args(["plot", "--rounds"])
        .arg(&rounds)
        .arg("--out")
        .arg(&plot_dir)
        .output()
        .expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["progress.png", "progress.svg", "gate-q2.md"] {
        assert!(std::fs::metadata(plot_dir.join(f)).expect(f).len() > 0);
    }

    // Bad input: one line naming the file.
    std::fs::write(&rounds, "[{\"round\": 0}]").expect("write");
    let o = std::process::Command::new(bin)
        .args(["plot", "--rounds"])
        .arg(&rounds)
        .arg("--out")
        .arg(&plot_dir)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rounds.json") && err.contains("not a rounds file") && err.lines().count() == 1,
        "{err}"
    );
}

/// SmolLM2-135M-Instruct (the real demo model), 2 vignettes, think 4. The expected numbers come from the same
/// GGUF dequantised to f32 by a scratch script (Q4_1/Q8_0 → f32, llama.cpp's Q/K row permutation undone) and
/// run through this eval, so this also checks the GGUF loader end to end.
#[test]
fn smollm2_short_eval_matches_the_dequantised_reference() {
    if std::env::var_os("STEER_HEAL_SKIP_REAL").is_some() {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `just fetch-model` (or set STEER_HEAL_SKIP_REAL=1)",
        path.display()
    );
    let lm = load_model(&path, Some(DType::F32), &Device::Cpu).expect("load SmolLM2");
    let ids = answer_token_ids(&lm.tokenizer).expect("distinct first tokens");
    assert_eq!(ids, [3325, 29389, 92, 7076, 30388, 5474, 17009]);
    let hooks = Hooks::none();
    let cfg = EvalConfig {
        n_vignettes: Some(2),
        think_tokens: 4,
        json_probe_max_tokens: 16,
        ..EvalConfig::default()
    };
    let r = run_eval(&EvalModel::from_loaded(&lm, &hooks), &cfg, &mut Silent::default()).expect("eval");
    let m = &r.metrics;
    assert!((m.p_ans_any - 0.2745).abs() < 0.02, "p_ans_any {}", m.p_ans_any);
    assert!((m.ppx_json - 11.28).abs() < 0.5, "ppx_json {}", m.ppx_json);
    assert!((m.authority - -4.400).abs() < 0.1, "authority {}", m.authority);
    assert!((m.care - -4.923).abs() < 0.1, "care {}", m.care);
    assert_eq!(m.json_is_valid, Some(1.0));
    assert!(
        r.rows[0].frames[0].think_text.starts_with("\nThe sentence is"),
        "{:?}",
        r.rows[0].frames[0].think_text
    );
    // The batched eval prefills each item's common prefix once for both frames; one sequence per batch prefills
    // every prompt whole. Same think texts, same metrics up to rounding.
    assert!(r.timings.shared_prompt_tokens > 20, "shared {}", r.timings.shared_prompt_tokens);
    let one_cfg = EvalConfig { batch_size: 1, json_probe: false, ..cfg.clone() };
    let one = run_eval(&EvalModel::from_loaded(&lm, &hooks), &one_cfg, &mut Silent::default()).expect("eval");
    assert_eq!(one.timings.shared_prompt_tokens, 0);
    for (a, b) in r.rows.iter().zip(&one.rows) {
        for (fa, fb) in a.frames.iter().zip(&b.frames) {
            assert_eq!(fa.think_text, fb.think_text, "item {}", a.id);
            for (x, y) in fa.lp.iter().zip(&fb.lp) {
                assert!((x - y).abs() < 1e-4 || (x.is_nan() && y.is_nan()), "item {}: lp {x} vs {y}", a.id);
            }
        }
    }
    assert!(
        (one.metrics.authority - m.authority).abs() < 1e-4,
        "{} vs {}",
        one.metrics.authority,
        m.authority
    );
    // Upstream's rendering repeats SmolLM2's default system prompt before "Just answer", and the model puts
    // less mass on the answer words after it.
    let up_cfg = EvalConfig { suffix: SuffixRendering::Upstream, json_probe: false, ..cfg };
    let ft = frame_tokens(&lm.chat, &lm.tokenizer, None, "x", FrameOrder::Forward, SuffixRendering::Upstream)
        .expect("frame");
    let suffix = lm.tokenizer.decode(&ft.suffix, true).expect("decode");
    assert!(suffix.starts_with("</think><|im_end|>\n<|im_start|>system\nYou are a helpful"), "{suffix}");
    let up = run_eval(&EvalModel::from_loaded(&lm, &hooks), &up_cfg, &mut Silent::default()).expect("eval");
    assert!(
        up.metrics.p_ans_any < m.p_ans_any - 0.02,
        "upstream p_ans_any {} vs ours {}",
        up.metrics.p_ans_any,
        m.p_ans_any
    );
}

#[test]
fn progress_map_draws_control_arms_beside_their_round_and_old_rounds_still_plot() {
    use steer_heal::eval::plot::{load_controls, progress_svg};
    use steer_heal::eval::ControlArm;
    let d = tempfile::tempdir().expect("tmp");
    // controls.json as the loop writes it (null for a probe that did not run).
    let cpath = d.path().join("controls.json");
    std::fs::write(
        &cpath,
        r#"[{"arm":"steered","coefficient":4.5,"n":132,"authority":-2.9,"care":-0.7,"p_ans_any":0.91,"ppx_json":2.6,"json_is_valid":null},
            {"arm":"random","coefficient":4.5,"n":132,"authority":-2.35,"care":-1.25,"p_ans_any":0.97,"ppx_json":2.2,"json_is_valid":1.0},
            {"arm":"prompt_only","coefficient":0.0,"n":132,"authority":-2.5,"care":-1.0,"p_ans_any":null,"ppx_json":2.3,"json_is_valid":0.5}]"#,
    )
    .expect("write");
    let controls = load_controls(&cpath).expect("controls parse");
    assert_eq!(controls.iter().map(|c| c.arm).collect::<Vec<_>>(), ControlArm::ALL.to_vec());
    assert_eq!(controls[0].json_is_valid, None);
    assert!(controls[2].p_ans_any.is_nan());
    std::fs::write(&cpath, r#"[{"arm":"placebo","authority":1,"care":1,"p_ans_any":1,"ppx_json":1}]"#)
        .expect("write");
    let err = load_controls(&cpath).expect_err("unknown arm").to_string();
    assert!(err.contains("controls.json") && err.contains("not a controls file"), "{err}");

    let old = sample_rounds();
    let mut pts = old.clone();
    pts[1].controls = controls.clone();
    pts[4].controls = controls[..2].to_vec();
    let svg = progress_svg(&pts, 0.95).expect("svg");
    for arm in ControlArm::ALL {
        assert!(svg.contains(&format!("\n{}\n</text>", arm.legend())), "svg lacks the legend of {arm:?}");
    }
    // Each arm's marker is an outline in the arm's colour: one per control point on the map, one per finite
    // p_ans_any in the coherence panel, one in the legend.
    let plain = progress_svg(&old, 0.95).expect("svg");
    for (color, n) in [("#C85A00", 2 + 2 + 1), ("#6E6E6E", 2 + 2 + 1), ("#009696", 1 + 1)] {
        let marker = format!("<polyline fill=\"none\" opacity=\"1\" stroke=\"{color}\" stroke-width=\"2\"");
        assert_eq!(svg.matches(&marker).count(), n, "markers of colour {color}");
        assert_eq!(plain.matches(&marker).count(), 0);
    }
    for arm in ControlArm::ALL {
        assert!(!plain.contains(arm.legend()), "no controls, no legend entry for {arm:?}");
    }
    // A rounds file written before control arms existed still loads and plots.
    let rounds = d.path().join("rounds.json");
    let legacy: Vec<serde_json::Value> = old
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).expect("value");
            assert!(v.get("controls").is_none(), "an empty controls list is not written");
            v.as_object_mut().expect("object").remove("controls");
            v
        })
        .collect();
    std::fs::write(&rounds, serde_json::to_string(&legacy).expect("json")).expect("write");
    let back = load_rounds(&rounds).expect("old rounds file");
    assert_eq!(back, old);
    write_progress_map(&back, 0.95, d.path()).expect("old rounds plot");
    // With controls, rounds.json round-trips them.
    std::fs::write(&rounds, serde_json::to_string(&pts).expect("json")).expect("write");
    assert_eq!(load_rounds(&rounds).expect("rounds").iter().map(|p| p.controls.len()).sum::<usize>(), 5);
}
