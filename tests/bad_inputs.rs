//! The bad-input corpus: the real binary on damaged model files, vectors, session files, keymaps, personas and
//! options. Every case must exit non-zero with one line that names the file or the option, never panic, and
//! leave the good data it was pointed at byte-for-byte as it was.

mod common;

use candle_core::quantized::GgmlDType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use steer_heal::session::layout::LOCK;
use steer_heal::session::SessionDir;

const BIN: &str = env!("CARGO_BIN_EXE_steer-heal");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).env("XDG_CONFIG_HOME", "/nonexistent").output().expect("run steer-heal")
}

fn ok(args: &[&str]) {
    let out = run(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir` (but the session lock, which an opener may create) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != LOCK) {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// One case: run, expect failure, one line containing every needle, no panic, and `guard` unchanged.
fn refused(what: &str, args: &[&str], needles: &[&str], guard: &Path) {
    let before = snapshot(guard);
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{what}: exit 0\n{err}");
    assert!(!err.contains("panicked"), "{what}: panicked\n{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: not one line:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: does not say `{n}`:\n{err}");
    }
    assert!(snapshot(guard) == before, "{what}: changed files under {}", guard.display());
    eprintln!("{what}: {}", err.trim_end());
}

struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: String,
    vector: String,
}

/// A tiny model and an extracted, dosed vector.
fn world() -> World {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let (model, vector) = common::cli_tiny_model_and_vector(&root, true);
    let (model, vector) = (model.display().to_string(), vector.display().to_string());
    World { _tmp: tmp, root, model, vector }
}

/// Overwrite the first element of tensor `name` in a safetensors file with `v`.
fn poison(path: &Path, name: &str, v: f32) {
    let mut bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let start = header[name]["data_offsets"][0].as_u64().expect("tensor") as usize + 8 + n;
    bytes[start..start + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn vectors_with_nan_or_inf_are_refused_and_nothing_is_written() {
    let w = world();
    let bad_dir = w.root.join("bad");
    std::fs::create_dir_all(&bad_dir).expect("mkdir");
    let bad = bad_dir.join("vector.safetensors");
    std::fs::copy(&w.vector, &bad).expect("copy");
    let layer =
        steer_heal::steer::SteerVector::load(Path::new(&w.vector)).expect("good vector").meta.layers[0];
    let tensor = format!("layer{layer}.v");
    let out = w.root.join("out").display().to_string();
    for v in [f32::NAN, f32::INFINITY] {
        poison(&bad, &tensor, v);
        let b = bad.display().to_string();
        let says = format!("tensor `{tensor}` is {v} at element 0");
        refused(
            "generate with a poisoned vector",
            &[
                "generate",
                "--model",
                &w.model,
                "--vector",
                &b,
                "--n-prompts",
                "1",
                "--max-new-tokens",
                "4",
                "--out",
                &out,
            ],
            &[&b, &says],
            &bad_dir,
        );
        refused(
            "dose with a poisoned vector",
            &[
                "dose",
                "--model",
                &w.model,
                "--vector",
                &b,
                "--n-prompts",
                "1",
                "--tokens",
                "4",
                "--out",
                &out,
            ],
            &[&b, &says],
            &bad_dir,
        );
        refused(
            "export-gguf of a poisoned vector",
            &["export-gguf", "--vector", &b, "--out", &format!("{out}.gguf")],
            &[&b, &says],
            &bad_dir,
        );
    }
    assert!(!Path::new(&out).join("completions.jsonl").exists());
}

#[test]
fn inconsistent_model_files_are_refused() {
    let w = world();
    let gguf = w.root.join("models").join("tiny.gguf");
    std::fs::create_dir_all(gguf.parent().expect("parent")).expect("mkdir");
    common::write_gguf_from_dir(Path::new(&w.model), &gguf, GgmlDType::Q8_0);
    let mut bytes = std::fs::read(&gguf).expect("read");
    common::shift_tensor_offset(&mut bytes, "blk.0.attn_norm.weight", 3);
    std::fs::write(&gguf, bytes).expect("write");
    let g = gguf.display().to_string();
    let guard = gguf.parent().expect("parent");
    refused(
        "chat on a misaligned GGUF",
        &["chat", "--model", &g, "hello"],
        &[&g, "blk.0.attn_norm.weight", "alignment"],
        guard,
    );
    refused(
        "convert of a misaligned GGUF",
        &["convert", &g, &w.root.join("conv").display().to_string()],
        &[&g, "alignment"],
        guard,
    );
    assert!(!w.root.join("conv").join("model.safetensors").exists(), "nothing converted");
    // A config that disagrees with its weights, and an impossible value.
    let cfg = Path::new(&w.model).join("config.json");
    let good = std::fs::read_to_string(&cfg).expect("read");
    let mut v: serde_json::Value = serde_json::from_str(&good).expect("json");
    v["rms_norm_eps"] = serde_json::json!(-1.0);
    std::fs::write(&cfg, v.to_string()).expect("write");
    refused(
        "chat with rms_norm_eps -1",
        &["chat", "--model", &w.model, "hello"],
        &[&cfg.display().to_string(), "rms_norm_eps is -1"],
        Path::new(&w.model),
    );
    std::fs::write(&cfg, &good).expect("restore");
}

#[test]
fn options_no_run_means_are_refused() {
    let w = world();
    let out = w.root.join("out").display().to_string();
    let m = &w.model;
    let v = &w.vector;
    let guard = Path::new(m);
    for (what, args, needle) in [
        ("temperature NaN", vec!["chat", "--model", m, "--temperature", "NaN", "hi"], "--temperature"),
        ("temperature inf", vec!["chat", "--model", m, "--temperature", "inf", "hi"], "--temperature"),
        ("temperature -1", vec!["chat", "--model", m, "--temperature", "-1", "hi"], "--temperature"),
        ("top-p 5", vec!["generate", "--model", m, "--vector", v, "--out", &out, "--top-p", "5"], "--top-p"),
        (
            "n-prompts 0",
            vec!["generate", "--model", m, "--vector", v, "--out", &out, "--n-prompts", "0"],
            "--n-prompts",
        ),
        ("empty chat prompt", vec!["chat", "--model", m, "  "], "the prompt is empty"),
        ("lr NaN", vec!["heal", "--model", m, "--completions", v, "--out", &out, "--lr", "NaN"], "--lr"),
    ] {
        refused(what, &args, &[needle], guard);
    }
}

#[test]
fn keymaps_and_personas_that_cannot_work_are_refused() {
    let w = world();
    let dir = w.root.join("inputs");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let km = dir.join("keymap.toml");
    std::fs::write(&km, "[global]\nq = \"none\"\n\"ctrl-c\" = \"none\"\n").expect("write");
    let k = km.display().to_string();
    let session = w.root.join("s").display().to_string();
    refused(
        "a keymap with no quit key",
        &["tui", &session, "--model", &w.model, "--keymap", &k],
        &[&k, "quit"],
        &dir,
    );
    assert!(!Path::new(&session).exists(), "no session was created");
    let persona = dir.join("persona.toml");
    let text =
        steer_heal::steer::persona::DEFAULT_PERSONA_TOML.replacen("prompts = [", "prompts = [\"   \", ", 1);
    std::fs::write(&persona, text).expect("write");
    let p = persona.display().to_string();
    refused(
        "a persona with an empty prompt",
        &["extract", "--model", &w.model, "--persona", &p, "--out", &w.root.join("x").display().to_string()],
        &[&p, "prompts", "is empty"],
        &dir,
    );
}

#[test]
fn damaged_session_files_are_refused_naming_the_file() {
    let w = world();
    let s = w.root.join("sessions").join("one");
    let sd = s.display().to_string();
    ok(&[&["run", "--session", &sd, "--model", &w.model, "--vector", &w.vector], common::FAST_TINY_ROUND]
        .concat());
    let layout = SessionDir::new(&s);
    let copy = |name: &str| -> PathBuf {
        let to = w.root.join("sessions").join(name);
        let st = Command::new("cp").arg("-a").arg(&s).arg(&to).status().expect("cp");
        assert!(st.success());
        to
    };
    // A line in the middle of the log that is not JSON.
    let a = copy("garbled");
    let events = SessionDir::new(&a).events();
    let text = std::fs::read_to_string(&events).expect("read");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[1] = lines[1][..lines[1].len() / 2].to_string();
    std::fs::write(&events, lines.join("\n") + "\n").expect("write");
    refused(
        "a garbled log line",
        &["tui", &a.display().to_string()],
        &[&events.display().to_string(), "line 2"],
        &a,
    );
    // A completions file emptied after it was written: its completions and their decisions would vanish.
    let b = copy("emptied");
    let state = steer_heal::session::read_saved(&b).expect("fold");
    let file = &state.rounds[&1].completion_files[0].file;
    let path = b.join(file);
    std::fs::write(&path, "").expect("empty it");
    refused(
        "an emptied completions file",
        &["tui", &b.display().to_string()],
        &[&path.display().to_string(), "lacks"],
        &b,
    );
    // An empty prompt in session.toml.
    let c = copy("prompt");
    let manifest = SessionDir::new(&c).manifest();
    let toml =
        std::fs::read_to_string(&manifest).expect("read").replacen("prompts = [", "prompts = [\"\", ", 1);
    std::fs::write(&manifest, toml).expect("write");
    refused(
        "an empty session prompt",
        &["tui", &c.display().to_string()],
        &[&manifest.display().to_string(), "generation.prompts[0] is empty"],
        &c,
    );
    // A stale temp file from a failed write goes on the next open; the rest stays.
    let stale = layout.root().join(".rounds.json.999999.tmp");
    std::fs::write(&stale, vec![0u8; 4096]).expect("write");
    ok(&["run", "--session", &sd, "--model", &w.model, "--rounds", "1"]);
    assert!(!stale.exists(), "the stale temp file was removed");
    assert!(steer_heal::session::read_saved(&s).is_ok());
}

#[test]
fn a_bad_isa_cap_or_a_missing_named_blas_is_one_line_and_a_failure() {
    for (var, value, needle) in [
        ("STEER_HEAL_ISA", "avx3", "STEER_HEAL_ISA=avx3"),
        ("STEER_HEAL_BLAS", "/nonexistent/libopenblas.so", "STEER_HEAL_BLAS=/nonexistent/libopenblas.so"),
    ] {
        let out = Command::new(BIN)
            .args(["eval", "--help"])
            .env(var, value)
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .expect("run steer-heal");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was accepted");
        assert_eq!(err.trim().lines().count(), 1, "{var}={value}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{var}={value}: {err}");
    }
    // The valid caps start.
    for cap in ["auto", "avx2", "baseline"] {
        let out =
            Command::new(BIN).args(["eval", "--help"]).env("STEER_HEAL_ISA", cap).output().expect("run");
        assert!(out.status.success(), "STEER_HEAL_ISA={cap}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
