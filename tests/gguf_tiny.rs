//! GGUF files written from tiny random models in llama.cpp's conventions: loading them gives the same logits as
//! the Hugging Face directory they came from (so names, the Llama Q/K permutation and Gemma's `1 + w` norms are
//! undone), and `convert` writes a directory that loads back with identical logits, tokenizer and template.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use steer_heal::model::gguf::{convert_gguf, load_gguf};
use steer_heal::model::{
    load_model, tiny::make_tiny_model, Arch, Forward, Hooks, LoadedModel, LogitsAt, Path,
};

fn logits(m: &LoadedModel, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu).expect("ids").unsqueeze(0).expect("batch");
    let hooks = Hooks::none();
    let f = Forward {
        hooks: &hooks,
        pad: &[],
        logits: LogitsAt::All,
        path: Path::Inference,
        adapters: steer_heal::model::Adapters::AsGated,
    };
    m.model.forward(&x, None, &f).expect("forward").logits.expect("logits")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32")
}

fn ids() -> Vec<u32> {
    (0..24u32).map(|i| (i * 53 + 7) % 250).collect()
}

/// Tiny HF dir, its GGUF (projection weights in `quant`), and both loaded.
fn tiny_pair(arch: Arch, quant: GgmlDType) -> (tempfile::TempDir, LoadedModel, LoadedModel) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("hf");
    make_tiny_model(arch, &dir, 11).expect("tiny model");
    let gguf = tmp.path().join("tiny.gguf");
    common::write_gguf_from_dir(&dir, &gguf, quant);
    let hf = load_model(&dir, Some(DType::F32), &Device::Cpu).expect("load hf");
    let gg = load_gguf(&gguf, Some(DType::F32), &Device::Cpu).expect("load gguf");
    (tmp, hf, gg)
}

fn gguf_matches_source(arch: Arch) {
    let (_tmp, hf, gg) = tiny_pair(arch, GgmlDType::F32);
    assert_eq!(hf.model.cfg.num_hidden_layers, gg.model.cfg.num_hidden_layers);
    assert_eq!(hf.model.cfg.sliding_layers, gg.model.cfg.sliding_layers);
    assert_eq!(hf.model.cfg.tie_word_embeddings, gg.model.cfg.tie_word_embeddings);
    let d = max_abs(&logits(&hf, &ids()), &logits(&gg, &ids()));
    assert!(d <= 1e-4, "{arch:?}: GGUF logits differ from the source directory by {d}");
    let text = "the theory <|im_end|> ther";
    assert_eq!(hf.tokenizer.encode(text).expect("enc"), gg.tokenizer.encode(text).expect("enc"));
    assert_eq!(hf.tokenizer.stop_ids, gg.tokenizer.stop_ids);
    assert_eq!(hf.chat.prompt(Some("sys"), "hi").expect("p"), gg.chat.prompt(Some("sys"), "hi").expect("p"));
}

#[test]
fn llama_gguf_matches_its_source() {
    gguf_matches_source(Arch::Llama);
}

#[test]
fn qwen3_gguf_matches_its_source() {
    gguf_matches_source(Arch::Qwen3);
}

#[test]
fn gemma3_gguf_matches_its_source() {
    gguf_matches_source(Arch::Gemma3);
}

#[test]
fn quantised_gguf_is_close_to_its_source() {
    // Q8_0 projections: rounding only, so logits stay close; a layout error would not.
    let (_tmp, hf, gg) = tiny_pair(Arch::Llama, GgmlDType::Q8_0);
    let want = logits(&hf, &ids());
    let d = max_abs(&want, &logits(&gg, &ids()));
    let scale = want.abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("f32");
    eprintln!("Q8_0 tiny llama: max-abs {d} on logits up to {scale}");
    assert!(
        d > 0.0 && d <= 0.02 * scale,
        "Q8_0 GGUF logits differ from the source by {d} (largest logit {scale})"
    );
}

fn convert_roundtrips(arch: Arch) {
    let (tmp, _hf, gg) = tiny_pair(arch, GgmlDType::F32);
    let out = tmp.path().join("converted");
    convert_gguf(&tmp.path().join("tiny.gguf"), &out).expect("convert");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "convert did not write {f}");
    }
    let back = load_model(&out, Some(DType::F32), &Device::Cpu).expect("load converted");
    assert_eq!(back.model.cfg, gg.model.cfg);
    let d = max_abs(&logits(&gg, &ids()), &logits(&back, &ids()));
    assert_eq!(d, 0.0, "{arch:?}: converted directory logits differ by {d}");
    let text = "the theory <|im_end|> ther";
    assert_eq!(gg.tokenizer.encode(text).expect("enc"), back.tokenizer.encode(text).expect("enc"));
    assert_eq!(gg.tokenizer.stop_ids, back.tokenizer.stop_ids);
    assert_eq!(gg.chat.source(), back.chat.source());
    // HF names and layout: every tensor equals the source directory's (Llama q/k rows back in rotate-half order,
    // Gemma norms hold w, not 1 + w).
    let converted = common::dir_tensors(&out);
    let source = common::dir_tensors(&tmp.path().join("hf"));
    let mut a: Vec<&String> = converted.keys().collect();
    let mut b: Vec<&String> = source.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "converted tensor names differ from the source");
    for (name, t) in &source {
        let d = max_abs(t, &converted[name]);
        assert!(d <= 1e-6, "{arch:?}: converted `{name}` differs from the source by {d}");
    }
}

#[test]
fn convert_llama_roundtrips() {
    convert_roundtrips(Arch::Llama);
}

#[test]
fn convert_gemma3_roundtrips() {
    convert_roundtrips(Arch::Gemma3);
}
