//! Our decoder against candle-transformers' reference models on tiny random weights (f32, max-abs ≤ 1e-4),
//! plus KV-cache and training-path agreement.

mod common;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use common::tiny_model;
use steer_heal::model::{Arch, Forward, Hooks, LogitsAt, Path};

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).expect("same shape").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32")
}

fn ids() -> Vec<u32> {
    (0..20u32).map(|i| (i * 37 + 11) % 250).collect()
}

fn ours_last(m: &steer_heal::model::LoadedModel, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu).expect("ids").unsqueeze(0).expect("batch");
    let hooks = Hooks::none();
    let f = Forward {
        hooks: &hooks,
        pad: &[],
        logits: LogitsAt::Last,
        path: Path::Inference,
        adapters: steer_heal::model::Adapters::AsGated,
    };
    m.model.forward(&x, None, &f).expect("forward").logits.expect("logits").flatten_all().expect("flat")
}

fn reference_vb(dir: &std::path::Path) -> VarBuilder<'static> {
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).expect("weights");
    VarBuilder::from_tensors(st, DType::F32, &Device::Cpu)
}

#[test]
fn llama_matches_candle_transformers() {
    use candle_transformers::models::llama;
    let (dir, m) = tiny_model(Arch::Llama, 7);
    let cfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).expect("cfg"))
            .expect("json");
    let cfg = cfg.into_config(false);
    let reference = llama::Llama::load(reference_vb(dir.path()), &cfg).expect("reference");
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).expect("cache");
    let x = Tensor::new(ids().as_slice(), &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
    let want = reference.forward(&x, 0, &mut cache).expect("ref fwd").flatten_all().expect("flat");
    let got = ours_last(&m, &ids());
    let d = max_abs(&got, &want);
    assert!(d <= 1e-4, "llama max-abs {d}");
}

#[test]
fn qwen3_matches_candle_transformers() {
    use candle_transformers::models::qwen3;
    let (dir, m) = tiny_model(Arch::Qwen3, 7);
    let cfg: qwen3::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).expect("cfg"))
            .expect("json");
    let mut reference = qwen3::ModelForCausalLM::new(&cfg, reference_vb(dir.path())).expect("reference");
    let x = Tensor::new(ids().as_slice(), &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
    let want = reference.forward(&x, 0).expect("ref fwd").flatten_all().expect("flat");
    let got = ours_last(&m, &ids());
    let d = max_abs(&got, &want);
    assert!(d <= 1e-4, "qwen3 max-abs {d}");
}

#[test]
fn gemma3_matches_candle_transformers() {
    use candle_transformers::models::gemma3;
    let (dir, m) = tiny_model(Arch::Gemma3, 7);
    let cfg: gemma3::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).expect("cfg"))
            .expect("json");
    let mut reference = gemma3::Model::new(false, &cfg, reference_vb(dir.path())).expect("reference");
    let x = Tensor::new(ids().as_slice(), &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
    let want = reference.forward(&x, 0).expect("ref fwd").flatten_all().expect("flat");
    let got = ours_last(&m, &ids());
    let d = max_abs(&got, &want);
    assert!(d <= 1e-4, "gemma3 max-abs {d}");
}

/// Logits at every position, computed with the given path, optionally token by token through the KV cache.
fn all_logits(m: &steer_heal::model::LoadedModel, ids: &[u32], path: Path, incremental: bool) -> Tensor {
    let hooks = Hooks::none();
    let f = Forward {
        hooks: &hooks,
        pad: &[],
        logits: LogitsAt::All,
        path,
        adapters: steer_heal::model::Adapters::AsGated,
    };
    if !incremental {
        let x = Tensor::new(ids, &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
        return m.model.forward(&x, None, &f).expect("fwd").logits.expect("logits").squeeze(0).expect("sq");
    }
    let mut cache = m.model.new_cache();
    let mut rows = vec![];
    // A 5-token prefill, then one token at a time.
    let x = Tensor::new(&ids[..5], &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
    rows.push(
        m.model.forward(&x, Some(&mut cache), &f).expect("fwd").logits.expect("l").squeeze(0).expect("sq"),
    );
    for &t in &ids[5..] {
        let x = Tensor::new(&[t], &Device::Cpu).expect("ids").unsqueeze(0).expect("b");
        rows.push(
            m.model
                .forward(&x, Some(&mut cache), &f)
                .expect("fwd")
                .logits
                .expect("l")
                .squeeze(0)
                .expect("sq"),
        );
    }
    Tensor::cat(&rows, 0).expect("cat")
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, m) = tiny_model(arch, 7);
        let full = all_logits(&m, &ids(), Path::Inference, false);
        let inc = all_logits(&m, &ids(), Path::Inference, true);
        let d = max_abs(&full, &inc);
        assert!(d <= 1e-4, "{arch:?} cache vs full {d}");
    }
}

#[test]
fn training_path_equals_inference_path() {
    for arch in [Arch::Llama, Arch::Qwen3, Arch::Gemma3] {
        let (_d, m) = tiny_model(arch, 7);
        let a = all_logits(&m, &ids(), Path::Inference, false);
        let b = all_logits(&m, &ids(), Path::Training, false);
        let d = max_abs(&a, &b);
        assert!(d <= 1e-4, "{arch:?} training vs inference {d}");
        // And the logits are not degenerate (a test that could not fail would prove nothing).
        let spread =
            a.max_keepdim(D::Minus1).expect("max").mean_all().expect("m").to_scalar::<f32>().expect("s");
        assert!(spread.is_finite());
    }
}
