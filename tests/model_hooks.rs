//! Model-level behaviour on tiny random models: steering hooks, captures, LoRA gradients and merging, batched
//! generation with left padding, chat templates.

mod common;
use candle_core::{backprop::GradStore, Device, Tensor, Var};
use common::tiny_model;
use std::collections::BTreeMap;
use steer_heal::model::decoder::PROJECTIONS;
use steer_heal::model::generate::{generate, Sampling};
use steer_heal::model::{
    Adapter, Arch, CapturePositions, Forward, Hooks, LoadedModel, LogitsAt, Message, Path, Steer,
};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).expect("shape").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32")
}

fn input(lm: &LoadedModel) -> Tensor {
    let ids = lm
        .tokenizer
        .encode(&lm.chat.prompt(Some("Be brief."), "Should I tell my boss?").expect("tmpl"))
        .expect("enc");
    Tensor::new(ids.as_slice(), &Device::Cpu).expect("t").unsqueeze(0).expect("b")
}

#[test]
fn steering_at_layer_l_leaves_earlier_layers_and_changes_later_ones() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, lm) = tiny_model(arch, 11);
        let n = lm.model.cfg.num_hidden_layers;
        let l = 1;
        let x = input(&lm);
        let all: Vec<usize> = (0..n).collect();
        let cap = Hooks::capture(all.clone(), CapturePositions::All);
        let base = lm.model.forward(&x, None, &Forward::infer(&cap)).expect("fwd");
        let v = Tensor::randn(0f32, 1.0, lm.model.cfg.hidden_size, &Device::Cpu).expect("v");
        let mut hooks = Hooks::steer(&BTreeMap::from([(l, v)]), 4.0);
        hooks.capture = cap.capture.clone();
        let steered = lm.model.forward(&x, None, &Forward::infer(&hooks)).expect("fwd");
        for i in 0..n {
            let d = max_abs(&base.hidden[&i], &steered.hidden[&i]);
            if i < l {
                assert_eq!(d, 0.0, "{arch:?} layer {i} before the hook changed");
            } else {
                assert!(d > 1e-3, "{arch:?} layer {i} after the hook unchanged ({d})");
            }
        }
        let dl = max_abs(base.logits.as_ref().expect("l"), steered.logits.as_ref().expect("l"));
        assert!(dl > 1e-3, "{arch:?} logits unchanged");
    }
}

#[test]
fn coefficient_zero_is_exactly_the_base_and_start_index_limits_the_steer() {
    let (_d, lm) = tiny_model(Arch::Llama, 11);
    let x = input(&lm);
    let t = x.dim(1).expect("t");
    let none = Hooks::none();
    let base = lm.model.forward(&x, None, &Forward::infer(&none)).expect("fwd").logits.expect("l");
    let v = Tensor::randn(0f32, 1.0, lm.model.cfg.hidden_size, &Device::Cpu).expect("v");
    let zero = Hooks::steer(&BTreeMap::from([(2, v.clone())]), 0.0);
    let z = lm.model.forward(&x, None, &Forward::infer(&zero)).expect("fwd").logits.expect("l");
    assert_eq!(max_abs(&base, &z), 0.0);
    let start = t - 3;
    let late = Hooks { capture: None, steer: vec![Steer { layer: 2, vector: v, coeffs: vec![5.0], start }] };
    let s = lm.model.forward(&x, None, &Forward::infer(&late)).expect("fwd").logits.expect("l");
    let before = max_abs(&base.narrow(1, 0, start).expect("n"), &s.narrow(1, 0, start).expect("n"));
    let after = max_abs(&base.narrow(1, start, 3).expect("n"), &s.narrow(1, start, 3).expect("n"));
    assert_eq!(before, 0.0, "positions before start must be untouched");
    assert!(after > 1e-3);
}

#[test]
fn capture_last_equals_last_row_of_capture_all() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let x = input(&lm);
    let t = x.dim(1).expect("t");
    let all = lm
        .model
        .forward(&x, None, &Forward::infer(&Hooks::capture(vec![2], CapturePositions::All)))
        .expect("f");
    let last = lm
        .model
        .forward(&x, None, &Forward::infer(&Hooks::capture(vec![2], CapturePositions::Last)))
        .expect("f");
    let a = all.hidden[&2].narrow(1, t - 1, 1).expect("n").squeeze(1).expect("s");
    assert_eq!(max_abs(&a, &last.hidden[&2]), 0.0);
}

/// Attach one trainable adapter (rank 4) to every projection of every layer; returns the vars.
fn attach_adapters(lm: &mut LoadedModel) -> Vec<(String, Var, Var)> {
    let mut vars = vec![];
    for (li, layer) in lm.model.layers.iter_mut().enumerate() {
        for name in PROJECTIONS {
            let lin = layer.projection_mut(name).expect("projection");
            let a = Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (4, lin.in_dim()), &Device::Cpu).expect("a") * 0.1).expect("s"),
            )
            .expect("var");
            let b = Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (lin.out_dim(), 4), &Device::Cpu).expect("b") * 0.01).expect("s"),
            )
            .expect("var");
            lin.adapters.push(Adapter {
                name: "r0".into(),
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 2.0,
                gate: 1.0,
            });
            vars.push((format!("{li}.{name}"), a, b));
        }
    }
    vars
}

#[test]
fn every_lora_a_and_b_gets_a_gradient_on_the_training_path() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, mut lm) = tiny_model(arch, 11);
        let vars = attach_adapters(&mut lm);
        let x = input(&lm);
        let none = Hooks::none();
        let f = Forward {
            hooks: &none,
            pad: &[],
            logits: LogitsAt::All,
            path: Path::Training,
            adapters: steer_heal::model::Adapters::AsGated,
        };
        let logits = lm.model.forward(&x, None, &f).expect("fwd").logits.expect("l");
        let loss = candle_nn::loss::cross_entropy(
            &logits.squeeze(0).expect("s").narrow(0, 0, x.dim(1).expect("t") - 1).expect("n"),
            &x.squeeze(0).expect("s").narrow(0, 1, x.dim(1).expect("t") - 1).expect("n"),
        )
        .expect("loss");
        let grads: GradStore = loss.backward().expect("backward");
        for (name, a, b) in &vars {
            for (which, v) in [("A", a), ("B", b)] {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{arch:?} {name} {which}: no gradient"));
                let n = g.abs().expect("abs").sum_all().expect("sum").to_scalar::<f32>().expect("f32");
                assert!(n > 0.0 && n.is_finite(), "{arch:?} {name} {which}: zero gradient");
            }
        }
    }
}

#[test]
fn inference_path_gives_no_gradient_which_is_why_training_has_its_own_path() {
    // Documents the pitfall: the fused kernels drop gradients silently.
    let (_d, mut lm) = tiny_model(Arch::Llama, 11);
    let vars = attach_adapters(&mut lm);
    let x = input(&lm);
    let none = Hooks::none();
    let logits = lm.model.forward(&x, None, &Forward::infer(&none)).expect("fwd").logits.expect("l");
    let loss = logits.sqr().expect("sq").mean_all().expect("m");
    let grads = loss.backward().expect("backward");
    // Projections feeding only into fused ops upstream of the loss lose their gradient somewhere.
    let missing = vars.iter().filter(|(_, a, _)| grads.get(a.as_tensor()).is_none()).count();
    assert!(missing > 0, "expected the fused inference path to drop some gradients");
}

#[test]
fn merged_weights_give_the_same_logits_as_unmerged_adapters() {
    let (_d, mut lm) = tiny_model(Arch::Gemma3, 11);
    attach_adapters(&mut lm);
    let x = input(&lm);
    let none = Hooks::none();
    let unmerged = lm.model.forward(&x, None, &Forward::infer(&none)).expect("fwd").logits.expect("l");
    // The copy an eval runs on: same logits, and the original keeps its adapters (the student trains on).
    let copy = lm.model.merged_copy().expect("copy").expect("some");
    assert!(copy.layers.iter().all(|l| PROJECTIONS.iter().all(|n| l
        .projection(n)
        .expect("p")
        .adapters
        .is_empty())));
    let from_copy = copy.forward(&x, None, &Forward::infer(&none)).expect("fwd").logits.expect("l");
    let d = max_abs(&unmerged, &from_copy);
    assert!(d < 1e-4, "merged copy vs unmerged {d}");
    assert!(lm.model.layers.iter().all(|l| l.projection("q_proj").expect("p").adapters.len() == 1));
    for layer in lm.model.layers.iter_mut() {
        for name in PROJECTIONS {
            layer.projection_mut(name).expect("p").merge().expect("merge");
        }
    }
    let merged = lm.model.forward(&x, None, &Forward::infer(&none)).expect("fwd").logits.expect("l");
    let d = max_abs(&unmerged, &merged);
    assert!(d < 1e-4, "merged vs unmerged {d}");
    assert!(lm.model.merged_copy().expect("copy").is_none(), "nothing attached: no copy");
}

#[test]
fn batched_left_padded_generation_equals_one_at_a_time() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let (_d, lm) = tiny_model(arch, 11);
        let prompts: Vec<Vec<u32>> = ["Hi", "Tell me about the weather in spring, please.", "Why?"]
            .iter()
            .map(|p| lm.tokenizer.encode(&lm.chat.prompt(None, p).expect("t")).expect("e"))
            .collect();
        let s = Sampling { temperature: 0.8, top_p: 0.95, top_k: 20, seed: 5, max_new_tokens: 12 };
        let v = Tensor::randn(0f32, 1.0, lm.model.cfg.hidden_size, &Device::Cpu).expect("v");
        let hooks = Hooks::steer(&BTreeMap::from([(1, v)]), 1.5);
        let pad = lm.tokenizer.pad_id;
        let batch = generate(&lm.model, &prompts, &s, &hooks, &[], pad, &mut |_| true).expect("gen");
        for (i, p) in prompts.iter().enumerate() {
            let one_s = Sampling { seed: s.seed + i as u64, ..s };
            let one = generate(&lm.model, std::slice::from_ref(p), &one_s, &hooks, &[], pad, &mut |_| true)
                .expect("g");
            assert_eq!(batch.tokens[i], one.tokens[0], "{arch:?} row {i}");
            for (a, b) in batch.logprobs[i].iter().zip(&one.logprobs[0]) {
                assert!((a - b).abs() < 1e-3, "{arch:?} row {i} logprob {a} vs {b}");
            }
        }
    }
}

/// The eval's shared prefill: prefixes computed once and continued by several rows reach the state a plain
/// left-padded prefill of the whole prompts reaches (same last logits, same next steps), with steering on.
#[test]
fn a_shared_prefix_prefill_equals_prefilling_every_prompt() {
    use steer_heal::model::generate::Decoder;
    for arch in [Arch::Llama, Arch::Gemma3] {
        let (_d, lm) = tiny_model(arch, 11);
        let enc = |p: &str| lm.tokenizer.encode(&lm.chat.prompt(None, p).expect("t")).expect("e");
        // Two items of different prefix lengths, two continuations each, all continuations 4 tokens.
        let (a, b) = (enc("Tell me about the weather in spring, please."), enc("Why?"));
        let rests = [[5u32, 9, 2, 7], [5, 3, 3, 8], [1, 2, 3, 4], [9, 8, 7, 6]];
        let prefixes = vec![a.clone(), b.clone()];
        let rows: Vec<(usize, Vec<u32>)> =
            rests.iter().enumerate().map(|(r, t)| (r / 2, t.to_vec())).collect();
        let whole: Vec<Vec<u32>> = rows.iter().map(|(i, t)| [prefixes[*i].as_slice(), t].concat()).collect();
        let v = Tensor::randn(0f32, 1.0, lm.model.cfg.hidden_size, &Device::Cpu).expect("v");
        let hooks = Hooks::steer(&BTreeMap::from([(1, v)]), 1.5);
        let pad = lm.tokenizer.pad_id;
        let mut plain = Decoder::prefill(&lm.model, &whole, pad, &hooks).expect("plain");
        let mut shared = Decoder::prefill_shared(&lm.model, &prefixes, &rows, pad, &hooks).expect("shared");
        assert_eq!(plain.pad(), shared.pad(), "{arch:?}: the rows keep the plain prefill's padding");
        assert_eq!(plain.cache.len(), shared.cache.len());
        for step in 0..3 {
            for (r, (x, y)) in plain.last_logits.iter().zip(&shared.last_logits).enumerate() {
                let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(d < 1e-4, "{arch:?} step {step} row {r}: logits differ by {d}");
            }
            let next: Vec<u32> = (0..rows.len() as u32).map(|r| (r * 7 + step) % 11 + 1).collect();
            plain.step(&next, &hooks).expect("step");
            shared.step(&next, &hooks).expect("step");
        }
        let bad = [(0usize, vec![1u32, 2]), (1, vec![3])];
        assert!(
            Decoder::prefill_shared(&lm.model, &prefixes, &bad, pad, &hooks).is_err(),
            "rests of two lengths"
        );
    }
}

#[test]
fn greedy_generation_is_deterministic_and_stops_on_stop_ids() {
    let (_d, lm) = tiny_model(Arch::Qwen3, 11);
    let p = lm.tokenizer.encode(&lm.chat.prompt(None, "Hello").expect("t")).expect("e");
    let s = Sampling::greedy(10);
    let a =
        generate(&lm.model, std::slice::from_ref(&p), &s, &Hooks::none(), &[], 0, &mut |_| true).expect("g");
    let b =
        generate(&lm.model, std::slice::from_ref(&p), &s, &Hooks::none(), &[], 0, &mut |_| true).expect("g");
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens[0].len(), 10);
    // Declaring the third greedy token a stop id ends generation right before it.
    let stop = a.tokens[0][2];
    let first = a.tokens[0].iter().position(|t| *t == stop).expect("present");
    let c = generate(&lm.model, &[p], &s, &Hooks::none(), &[stop], 0, &mut |_| true).expect("g");
    assert_eq!(c.tokens[0], a.tokens[0][..first].to_vec());
}

#[test]
fn chat_templates_render_generation_prompt_continuation_and_end_marker() {
    let (_d, lm) = tiny_model(Arch::Llama, 11);
    let p = lm.chat.prompt(Some("S"), "U").expect("render");
    assert_eq!(p, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(lm.chat.assistant_end().expect("end"), "<|im_end|>\n");
    let c = lm.chat.render_continue(&[Message::user("U"), Message::assistant("I think")]).expect("continue");
    assert!(c.ends_with("<|im_start|>assistant\nI think"), "{c}");
    let (_d2, g) = tiny_model(Arch::Gemma3, 11);
    let gp = g.chat.prompt(Some("S"), "U").expect("render");
    assert_eq!(gp, "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n");
    assert_eq!(g.chat.assistant_end().expect("end"), "<end_of_turn>\n");
    // Special tokens are single tokens, and the template text round-trips through the tokenizer.
    let ids = g.tokenizer.encode(&gp).expect("enc");
    assert_eq!(g.tokenizer.decode(&ids, true).expect("dec"), gp);
    assert!(g.tokenizer.stop_ids.contains(&g.tokenizer.inner.token_to_id("<end_of_turn>").expect("id")));
}

#[test]
fn logits_from_a_position_are_the_tail_of_every_positions_logits() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let (_d, lm) = tiny_model(arch, 11);
        let x = input(&lm);
        let t = x.dim(1).expect("t");
        let none = Hooks::none();
        let all = lm.model.forward(&x, None, &Forward::infer(&none)).expect("fwd").logits.expect("l");
        let p = t - 3;
        let f = Forward { logits: LogitsAt::From(p), ..Forward::infer(&none) };
        let tail = lm.model.forward(&x, None, &f).expect("fwd").logits.expect("l");
        assert_eq!(tail.dims(), &[1, 3, lm.model.cfg.vocab_size]);
        assert!(max_abs(&tail, &all.narrow(1, p, 3).expect("narrow")) <= 1e-5, "{arch:?}");
        // A start past the last position is an error, not an empty tensor.
        let f = Forward { logits: LogitsAt::From(t), ..Forward::infer(&none) };
        assert!(lm.model.forward(&x, None, &f).is_err());
    }
}
