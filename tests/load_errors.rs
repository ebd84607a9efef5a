//! Bad input gives one clear line naming the file and the problem, never a panic: one test per case, plus the
//! binary's exit code and stderr on one of them.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};
use steer_heal::model::{load_model, tiny::make_tiny_model, Arch};

/// A fresh tiny llama directory to damage.
fn tiny_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tiny");
    make_tiny_model(Arch::Llama, &dir, 3).expect("tiny model");
    (tmp, dir)
}

/// A tiny GGUF file to damage.
fn tiny_gguf() -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = tiny_dir();
    let out = tmp.path().join("tiny.gguf");
    common::write_gguf_from_dir(&dir, &out, GgmlDType::Q8_0);
    (tmp, out)
}

/// Load `path`, expect an error, and check it is one line naming `file` and containing every `needles` entry.
fn expect_error(path: &Path, file: &Path, needles: &[&str]) -> String {
    let err = match load_model(path, Some(DType::F32), &Device::Cpu) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    assert!(!err.is_empty(), "loading {} succeeded, expected an error", path.display());
    assert!(!err.contains('\n'), "error is not one line: {err:?}");
    assert!(err.contains(&file.display().to_string()), "error does not name {}: {err}", file.display());
    for n in needles {
        assert!(err.contains(n), "error does not say `{n}`: {err}");
    }
    eprintln!("{err}");
    err
}

#[test]
fn missing_config_json() {
    let (_tmp, dir) = tiny_dir();
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    expect_error(&dir, &dir.join("config.json"), &["missing", "model config"]);
}

#[test]
fn garbled_config_json() {
    let (_tmp, dir) = tiny_dir();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\", \"hidden_size\": ").expect("write");
    expect_error(&dir, &dir.join("config.json"), &["not valid JSON"]);
}

#[test]
fn unknown_architecture() {
    let (_tmp, dir) = tiny_dir();
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).expect("read").replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(&p, text).expect("write");
    expect_error(&dir, &p, &["unknown architecture `gpt_neox`"]);
}

#[test]
fn unknown_gguf_architecture() {
    let (_tmp, gguf) = tiny_gguf();
    let mut bytes = std::fs::read(&gguf).expect("read");
    // Same length, so the rest of the file stays valid: "llama" → "mamba".
    let at = bytes.windows(5).position(|w| w == b"llama").expect("architecture string");
    bytes[at..at + 5].copy_from_slice(b"mamba");
    std::fs::write(&gguf, bytes).expect("write");
    expect_error(&gguf, &gguf, &["unknown architecture `mamba`"]);
}

#[test]
fn tensor_shape_mismatch() {
    let (_tmp, dir) = tiny_dir();
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    v["intermediate_size"] = 96.into();
    std::fs::write(&p, v.to_string()).expect("write");
    expect_error(&dir, &dir.join("model.safetensors"), &["has shape", "mlp", "[96, 64]"]);
}

#[test]
fn truncated_safetensors() {
    let (_tmp, dir) = tiny_dir();
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).expect("read");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("write");
    expect_error(&dir, &p, &["not a valid safetensors file"]);
}

#[test]
fn truncated_gguf_tensor_data() {
    let (_tmp, gguf) = tiny_gguf();
    let bytes = std::fs::read(&gguf).expect("read");
    std::fs::write(&gguf, &bytes[..bytes.len() * 3 / 4]).expect("write");
    expect_error(&gguf, &gguf, &["truncated", "runs past the end of the file"]);
}

#[test]
fn truncated_gguf_header() {
    let (_tmp, gguf) = tiny_gguf();
    let bytes = std::fs::read(&gguf).expect("read");
    std::fs::write(&gguf, &bytes[..200]).expect("write");
    expect_error(&gguf, &gguf, &["truncated or corrupt"]);
}

#[test]
fn missing_tokenizer() {
    let (_tmp, dir) = tiny_dir();
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    expect_error(&dir, &dir.join("tokenizer.json"), &["missing", "tokenizer"]);
}

#[test]
fn unsupported_gguf_quantisation_type() {
    let (_tmp, gguf) = tiny_gguf();
    let mut bytes = std::fs::read(&gguf).expect("read");
    // ggml type 16 is IQ2_XXS, an importance-matrix type candle cannot read.
    common::patch_tensor_type(&mut bytes, "blk.0.attn_q.weight", 16);
    std::fs::write(&gguf, bytes).expect("write");
    expect_error(&gguf, &gguf, &["unsupported GGUF quantisation type 16 (IQ2_XXS)"]);
}

#[test]
fn misaligned_gguf_tensor_offset() {
    let (_tmp, gguf) = tiny_gguf();
    let mut bytes = std::fs::read(&gguf).expect("read");
    common::shift_tensor_offset(&mut bytes, "blk.0.attn_norm.weight", 3);
    std::fs::write(&gguf, bytes).expect("write");
    expect_error(
        &gguf,
        &gguf,
        &["tensor `blk.0.attn_norm.weight`", "not a multiple of the file's alignment 32"],
    );
}

/// Edit one field of a tiny model's config.json.
fn set_config(dir: &Path, key: &str, value: serde_json::Value) -> PathBuf {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    v[key] = value;
    std::fs::write(&p, v.to_string()).expect("write");
    p
}

#[test]
fn fewer_layers_in_the_config_than_in_the_weights() {
    let (_tmp, dir) = tiny_dir();
    let n = {
        let p = dir.join("config.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
        v["num_hidden_layers"].as_u64().expect("layers")
    };
    assert!(n >= 2);
    set_config(&dir, "num_hidden_layers", (n - 1).into());
    let _ = set_config(&dir, "layer_types", serde_json::Value::Null);
    expect_error(
        &dir,
        &dir,
        &[&format!("the config says {} blocks", n - 1), &format!("the weights hold {n}")],
    );
}

#[test]
fn qwen3_weights_relabelled_llama() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("qwen");
    make_tiny_model(Arch::Qwen3, &dir, 3).expect("tiny model");
    set_config(&dir, "model_type", "llama".into());
    expect_error(
        &dir,
        &dir,
        &["_norm.weight` (a per-head q/k norm", "is not used by `llama`", "is the architecture"],
    );
}

#[test]
fn impossible_config_values() {
    for (key, value, says) in [
        ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps is -1"),
        ("rms_norm_eps", serde_json::json!(0.0), "rms_norm_eps is 0"),
        ("rope_theta", serde_json::json!(0.0), "rope_theta is 0"),
    ] {
        let (_tmp, dir) = tiny_dir();
        let p = set_config(&dir, key, value);
        expect_error(&dir, &p, &[says, "must be a positive number"]);
    }
}

#[test]
fn binary_prints_one_line_and_fails() {
    let (_tmp, dir) = tiny_dir();
    std::fs::write(dir.join("config.json"), "not json").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_steer-heal"))
        .args(["chat", "--model"])
        .arg(&dir)
        .arg("hello")
        .output()
        .expect("run steer-heal");
    assert!(!out.status.success(), "exit status {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {stderr:?}");
    assert!(lines[0].starts_with("steer-heal: error: "), "{stderr}");
    assert!(lines[0].contains("config.json") && lines[0].contains("not valid JSON"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
