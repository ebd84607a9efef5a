//! A BLAS's `sgemm` for the large f32 products (Intel's MKL or OpenBLAS), when the machine has one: loaded at run
//! time, so nothing is needed to build and a machine without either runs gemm instead.
//!
//! Why: on the large products of a prefill and of a training step (thousands of rows against 576 × 1536 weights),
//! gemm reaches about 70 GFLOP/s on this project's 2-core AVX2 machine where OpenBLAS's Haswell kernels reach
//! 135–145, the same machine's PyTorch about 75–105 (bench/PROFILE.md). OpenBLAS is well kept, picks its kernels
//! at run time per CPU (Debian and most distributions build it with `DYNAMIC_ARCH`), and is one `apt install
//! libopenblas0` away.
//!
//! Why MKL first where it is present: on an Intel Xeon with AVX-512 a training step with MKL 2026.2 is 1.2× the
//! step with OpenBLAS 0.3.34 (bench/PROFILE.md, tenth pass), and MKL is what the PyTorch peer's products run on.
//! `steer-heal fetch-blas` fetches it (from Intel's PyPI wheels) only on Intel CPUs: it was never measured on
//! another vendor's, where OpenBLAS is measured 1.2–1.5× the peer.
//!
//! Which library: `STEER_HEAL_BLAS` names a file to load, or `off` to use gemm; unset, `SEARCH` is tried: MKL
//! and the OpenBLAS 0.3.34 that `steer-heal fetch-blas` puts in `.blas/` (from PyPI wheels), then the system's
//! OpenBLAS. The ISA cap holds for it too: under `STEER_HEAL_ISA=avx2` a library whose kernels are wider (OpenBLAS
//! reports its core, e.g. `SkylakeX`; MKL its code branch) is not used, and `baseline` never uses it.
//! `configure_env` (called by the binary at start-up, before any thread) asks the library for the capped kernels
//! (`OPENBLAS_CORETYPE=Haswell`, `MKL_ENABLE_INSTRUCTIONS=AVX2`), for the thread count candle uses, and for short
//! spinning of its idle threads, which would otherwise hold both cores between products against candle's own pool.

use crate::isa::{self, Isa};
use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

/// The environment variable that picks the library (a path, or `off`).
pub const ENV: &str = "STEER_HEAL_BLAS";

/// Libraries tried, in order, when `STEER_HEAL_BLAS` is unset: the two `steer-heal fetch-blas` puts in `.blas/`
/// (MKL 2026.2 from Intel's wheels, on Intel CPUs; OpenBLAS 0.3.34 from SciPy's wheel), then the system's OpenBLAS.
pub const SEARCH: [&str; 4] = [MKL_PATH, ".blas/libscipy_openblas.so", "libopenblas.so.0", "libopenblas.so"];

/// Where `steer-heal fetch-blas` puts MKL's single dynamic library (it loads the kernels, threading layer and
/// OpenMP runtime beside it).
pub const MKL_PATH: &str = ".blas/mkl/libmkl_rt.so.3";

/// Symbol prefixes: none (a system OpenBLAS), `scipy_` (SciPy's build).
const PREFIXES: [&str; 2] = ["", "scipy_"];

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type CoreName = unsafe extern "C" fn() -> *const c_char;
type SetThreads = unsafe extern "C" fn(c_int);
type MklVersion = unsafe extern "C" fn(*mut c_char, c_int);
type MklBranch = unsafe extern "C" fn() -> c_int;

/// Which library a `Blas` is: they name their kernels differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// OpenBLAS (a system build, or SciPy's with `scipy_`-prefixed symbols).
    OpenBlas,
    /// Intel's oneAPI MKL through `libmkl_rt`.
    Mkl,
}

impl Library {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Library::OpenBlas => "OpenBLAS",
            Library::Mkl => "MKL",
        }
    }
}

/// A loaded BLAS.
pub struct Blas {
    sgemm: Sgemm,
    /// What the library reports about itself (`openblas_get_config`), e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH ... Haswell".
    pub description: String,
    /// The kernel family it picked (`openblas_get_corename`; MKL's code branch, e.g. `avx512_e1`).
    pub core: String,
    /// Which library it is.
    pub library: Library,
    /// MKL's code branch number (`mkl_cbwr.h`), which decides the ISA cap; `None` for OpenBLAS.
    mkl_branch: Option<c_int>,
    /// The file it was loaded from.
    pub path: String,
    _lib: libloading::Library,
}

/// MKL's code branches (`mkl_cbwr_get_auto_branch`, numbered as in `mkl_cbwr.h`) by name; an unknown number is
/// named `branch <n>`, which counts as above AVX2.
fn mkl_branch_name(branch: c_int) -> String {
    let name = match branch {
        3 => "compatible",
        4 => "sse2",
        6 => "ssse3",
        7 => "sse4_1",
        8 => "sse4_2",
        9 => "avx",
        10 => "avx2",
        12 => "avx512",
        14 => "avx512_e1",
        _ => return format!("branch {branch}"),
    };
    name.to_string()
}

/// MKL's AVX2 code branch: the branches up to it (from 3, `compatible`) stay within AVX2; an unknown or
/// unreported branch counts as above.
const MKL_AVX2_BRANCH: c_int = 10;

/// Whether MKL's code branch `branch` stays within AVX2.
fn mkl_branch_within_avx2(branch: c_int) -> bool {
    (3..=MKL_AVX2_BRANCH).contains(&branch)
}

/// Cores whose kernels use AVX-512 (OpenBLAS's names).
const AVX512_CORES: [&str; 4] = ["skylakex", "cooperlake", "sapphirerapids", "zen4"];

impl Blas {
    fn open(path: &str) -> Result<Blas, String> {
        // A relative path with a directory part is a file (`libloading` would otherwise search the library path).
        let file = if path.contains('/') && !path.starts_with('/') {
            match std::fs::canonicalize(path) {
                Ok(p) => p.to_string_lossy().into_owned(),
                Err(e) => return Err(format!("{path}: {e}")),
            }
        } else {
            path.to_string()
        };
        // SAFETY: loading a shared library runs its initialisers; OpenBLAS's only start its thread pool.
        let lib = unsafe { libloading::Library::new(&file) }.map_err(|e| format!("{path}: {e}"))?;
        let prefix = PREFIXES
            .iter()
            // SAFETY: looking a symbol up does not call it.
            .find(|p| unsafe { lib.get::<Sgemm>(format!("{p}cblas_sgemm\0").as_bytes()) }.is_ok())
            .ok_or_else(|| format!("{path}: no cblas_sgemm"))?;
        let sym = |name: &str| format!("{prefix}{name}\0");
        // SAFETY: the symbols have these C signatures in every OpenBLAS (cblas.h, openblas_config.h).
        unsafe {
            let sgemm =
                *lib.get::<Sgemm>(sym("cblas_sgemm").as_bytes()).map_err(|e| format!("{path}: {e}"))?;
            let text = |name: &str| -> String {
                match lib.get::<CoreName>(sym(name).as_bytes()) {
                    Ok(f) => {
                        let p = f();
                        if p.is_null() {
                            String::new()
                        } else {
                            CStr::from_ptr(p).to_string_lossy().trim().to_string()
                        }
                    }
                    Err(_) => String::new(),
                }
            };
            if let Ok(version) = lib.get::<MklVersion>(b"MKL_Get_Version_String\0") {
                let mut buf = [0 as c_char; 256];
                version(buf.as_mut_ptr(), buf.len() as c_int);
                buf[buf.len() - 1] = 0;
                let description = CStr::from_ptr(buf.as_ptr()).to_string_lossy().trim().to_string();
                let branch = lib.get::<MklBranch>(b"MKL_CBWR_Get_Auto_Branch\0").map(|f| f()).unwrap_or(-1);
                if let Ok(set) = lib.get::<SetThreads>(b"MKL_Set_Num_Threads\0") {
                    set(threads() as c_int);
                }
                let core = mkl_branch_name(branch);
                return Ok(Blas {
                    sgemm,
                    description,
                    core,
                    library: Library::Mkl,
                    mkl_branch: Some(branch),
                    path: file,
                    _lib: lib,
                });
            }
            let core = text("openblas_get_corename");
            let description = text("openblas_get_config");
            if let Ok(set) = lib.get::<SetThreads>(sym("openblas_set_num_threads").as_bytes()) {
                set(threads() as c_int);
            }
            Ok(Blas {
                sgemm,
                description,
                core,
                library: Library::OpenBlas,
                mkl_branch: None,
                path: file,
                _lib: lib,
            })
        }
    }

    /// Whether its kernels stay within the instruction set the kernels may use.
    fn within(&self, isa: Isa) -> bool {
        match isa {
            Isa::Baseline => false,
            Isa::Avx2 => match self.library {
                Library::OpenBlas => !AVX512_CORES.contains(&self.core.to_lowercase().as_str()),
                Library::Mkl => self.mkl_branch.is_some_and(mkl_branch_within_avx2),
            },
            Isa::Avx512 => true,
        }
    }

    /// `sgemm` into a new buffer of `m · n`, which OpenBLAS writes whole (β = 0: C is not read, per the BLAS
    /// contract), so it is not zero-filled first; `None` where `sgemm` refuses the product.
    pub fn sgemm_new(
        &self,
        a: &[f32],
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
        b_transposed: bool,
    ) -> Option<Vec<f32>> {
        self.product_new(Product { m, n, k, alpha: 1.0, a_transposed: false, b_transposed }, a, b)
    }

    /// Row-major `c[m, n] = a[m, k] · op(b)`, `op(b) = bᵀ` for `b` `[n, k]` when `b_transposed`, else `b` `[k, n]`;
    /// all contiguous. Products whose sizes do not fit a C `int` are refused (`false`), for gemm to do.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        m: usize,
        k: usize,
        n: usize,
        b_transposed: bool,
    ) -> bool {
        self.product_into(Product { m, n, k, alpha: 1.0, a_transposed: false, b_transposed }, a, b, 0.0, c)
    }

    /// `p` into a new buffer of `m · n` (β = 0, so the buffer is not zero-filled first); `None` where the product
    /// is refused (`accepts`).
    pub fn product_new(&self, p: Product, a: &[f32], b: &[f32]) -> Option<Vec<f32>> {
        if !self.accepts(&p, a, b) {
            return None;
        }
        let mut c: Vec<f32> = Vec::with_capacity(p.m * p.n);
        // SAFETY: `accepts` checked the operands' lengths and the C sizes; the buffer has room for the m·n
        // elements, which a β = 0 product writes before anything reads them, and the length is set after.
        unsafe {
            self.sgemm_raw(&p, a, b, 0.0, c.as_mut_ptr());
            c.set_len(p.m * p.n);
        }
        Some(c)
    }

    /// `c ← p + β·c` for a `c` of `m · n` elements (β = 1 accumulates the product into `c`); `false` where the
    /// product is refused (`accepts`) or `c` is the wrong size.
    pub fn product_into(&self, p: Product, a: &[f32], b: &[f32], beta: f32, c: &mut [f32]) -> bool {
        if !self.accepts(&p, a, b) || c.len() != p.m * p.n {
            return false;
        }
        // SAFETY: the slices hold exactly the m·k, k·n and m·n elements the call reads and writes.
        unsafe { self.sgemm_raw(&p, a, b, beta, c.as_mut_ptr()) };
        true
    }

    /// Whether a product of these sizes and operands is one `sgemm_raw` may be given: non-empty, every size a C
    /// `int`, operands of exactly m·k and k·n elements.
    fn accepts(&self, p: &Product, a: &[f32], b: &[f32]) -> bool {
        let Product { m, n, k, .. } = *p;
        let fits = |x: usize| x <= c_int::MAX as usize;
        fits(m)
            && fits(n)
            && fits(k)
            && m.checked_mul(k).is_some_and(fits)
            && n.checked_mul(k).is_some_and(fits)
            && m.checked_mul(n).is_some_and(fits)
            && a.len() == m * k
            && b.len() == k * n
            && m > 0
            && n > 0
            && k > 0
    }

    /// The call itself: `c ← α·op(a)·op(b) + β·c`, every matrix row-major and contiguous.
    ///
    /// # Safety
    /// `accepts(p, a, b)` holds and `c` points to m·n writable elements (initialised unless β = 0).
    unsafe fn sgemm_raw(&self, p: &Product, a: &[f32], b: &[f32], beta: f32, c: *mut f32) {
        let Product { m, n, k, alpha, a_transposed, b_transposed } = *p;
        let (ta, lda) = if a_transposed { (TRANS, m) } else { (NO_TRANS, k) };
        let (tb, ldb) = if b_transposed { (TRANS, k) } else { (NO_TRANS, n) };
        // SAFETY: per this function's contract.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                ta,
                tb,
                m as c_int,
                n as c_int,
                k as c_int,
                alpha,
                a.as_ptr(),
                lda as c_int,
                b.as_ptr(),
                ldb as c_int,
                beta,
                c,
                n as c_int,
            )
        }
    }
}

/// One product `α · op(a) · op(b)` of row-major contiguous matrices: `op(a)` is `[m, k]` (`a` is stored `[k, m]`
/// when `a_transposed`), `op(b)` is `[k, n]` (`b` stored `[n, k]` when `b_transposed`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Product {
    /// Rows of the result.
    pub m: usize,
    /// Columns of the result.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// The factor on the product.
    pub alpha: f32,
    /// `a` is stored `[k, m]`.
    pub a_transposed: bool,
    /// `b` is stored `[n, k]`.
    pub b_transposed: bool,
}

impl Product {
    /// `op(a)[m, k] · op(b)[k, n]` with α = 1 and neither operand transposed.
    pub fn new(m: usize, n: usize, k: usize) -> Product {
        Product { m, n, k, alpha: 1.0, a_transposed: false, b_transposed: false }
    }

    /// With `a` stored transposed (`[k, m]`).
    pub fn at(self) -> Product {
        Product { a_transposed: true, ..self }
    }

    /// With `b` stored transposed (`[n, k]`).
    pub fn bt(self) -> Product {
        Product { b_transposed: true, ..self }
    }

    /// With the factor α.
    pub fn scaled(self, alpha: f32) -> Product {
        Product { alpha, ..self }
    }
}

/// Threads the BLAS runs with: candle's (`RAYON_NUM_THREADS`, which `configure` pins), else the machine's.
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Why no BLAS is in use (for reports), or `None` when one is.
pub fn unavailable_reason() -> Option<String> {
    match state() {
        Ok(_) => None,
        Err(e) => Some(e.clone()),
    }
}

/// What `STEER_HEAL_BLAS` asks for.
enum Choice {
    /// `off` or `none`: gemm does every product.
    Off,
    /// A library file.
    Named(String),
    /// Unset or empty: try `SEARCH`.
    Search,
}

fn choice() -> Choice {
    match std::env::var(ENV).ok().as_deref().map(str::trim) {
        Some("off") | Some("none") => Choice::Off,
        Some(path) if !path.is_empty() => Choice::Named(path.to_string()),
        _ => Choice::Search,
    }
}

fn state() -> &'static Result<Blas, String> {
    static BLAS: OnceLock<Result<Blas, String>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let isa = isa::active();
        if isa == Isa::Baseline {
            return Err(format!("not used at {}=baseline", isa::ENV));
        }
        let blas = match choice() {
            Choice::Off => return Err(format!("{ENV}=off")),
            Choice::Named(path) => Blas::open(&path)?,
            Choice::Search => {
                let mut errs = Vec::new();
                let mut found = None;
                for name in SEARCH {
                    match Blas::open(name) {
                        Ok(b) => {
                            found = Some(b);
                            break;
                        }
                        Err(e) => errs.push(e),
                    }
                }
                found.ok_or_else(|| format!("no OpenBLAS found ({})", errs.join("; ")))?
            }
        };
        if !blas.within(isa) {
            return Err(format!("{} uses {} kernels, above {}={isa}", blas.path, blas.core, isa::ENV));
        }
        Ok(blas)
    })
}

/// Refuse a library the user named that is not in use (it did not load, or its kernels are above the cap):
/// falling back to gemm would hide the mistake. Loads the library. At `baseline` no BLAS is used, named or not.
pub fn check() -> Result<(), String> {
    match (choice(), state()) {
        (Choice::Named(path), Err(why)) if isa::active() != Isa::Baseline => {
            Err(format!("{ENV}={path}: {why}"))
        }
        _ => Ok(()),
    }
}

/// The BLAS in use, if any.
pub fn get() -> Option<&'static Blas> {
    state().as_ref().ok()
}

/// Fewest rows for which a product goes to the BLAS: below, a call's fixed cost (waking its threads) is more than
/// gemm loses; at 64 rows and more it wins on every SmolLM2 shape (bench/PROFILE.md, `steer-heal bench-kernels`).
pub const MIN_ROWS: usize = 64;

/// Environment for OpenBLAS, set by the binary while it is still single-threaded (`model::cpu::configure`): the
/// capped core, candle's thread count, short idle spinning. Values the user set are kept.
pub fn configure_env(isa: Isa, threads: &str) {
    let set = |k: &str, v: &str| {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    };
    if isa == Isa::Avx2 && isa::detected() > Isa::Avx2 {
        set("OPENBLAS_CORETYPE", "Haswell");
        set("MKL_ENABLE_INSTRUCTIONS", "AVX2");
    }
    set("OPENBLAS_NUM_THREADS", threads);
    // 2^4 cycles of spinning before an idle OpenBLAS thread sleeps (its default is about 2^28: a tenth of a
    // second on both cores after every product, starving candle's element-wise pool).
    set("OPENBLAS_THREAD_TIMEOUT", "4");
    set("MKL_NUM_THREADS", threads);
    // MKL's own OpenMP runtime (libiomp5, beside it in `.blas/mkl/`), LP64 integers as `cblas_sgemm` is declared.
    set("MKL_THREADING_LAYER", "INTEL");
    set("MKL_INTERFACE_LAYER", "LP64");
    // 1 ms of spinning before an idle OpenMP thread sleeps (its default is 200 ms, the same starvation as above);
    // 0 was measured slower: 223 against 254 tok/s for a training step (bench/PROFILE.md, tenth pass).
    set("KMP_BLOCKTIME", "1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_a_plain_product_in_both_layouts() {
        let Some(blas) = get() else {
            eprintln!("no BLAS: {}", unavailable_reason().unwrap_or_default());
            return;
        };
        assert!(blas.within(isa::active()), "{} above the cap", blas.core);
        agrees_with_a_plain_product(blas);
    }

    /// Each library `steer-heal fetch-blas` placed in the workspace's `.blas/` (the tests run in `kernels/`, where
    /// `SEARCH`'s relative paths find none), opened directly: it identifies itself and computes the same products.
    #[test]
    fn every_fetched_library_names_its_kernels_and_matches_a_plain_product() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (path, library) in [(MKL_PATH, Library::Mkl), (".blas/libscipy_openblas.so", Library::OpenBlas)] {
            let file = root.join(path);
            if !file.exists() {
                eprintln!("{path}: not fetched");
                continue;
            }
            let blas = Blas::open(&file.to_string_lossy()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(blas.library, library, "{path}");
            assert!(
                !blas.core.is_empty() && !blas.core.starts_with("branch"),
                "{path}: core `{}`",
                blas.core
            );
            match library {
                Library::Mkl => {
                    assert!(blas.description.contains("Math Kernel Library"), "{}", blas.description)
                }
                Library::OpenBlas => assert!(blas.description.contains("OpenBLAS"), "{}", blas.description),
            }
            agrees_with_a_plain_product(&blas);
        }
    }

    #[test]
    fn mkl_branches_are_named_and_only_avx2_and_below_pass_the_avx2_cap() {
        assert_eq!(mkl_branch_name(10), "avx2");
        assert_eq!(mkl_branch_name(14), "avx512_e1");
        assert_eq!(mkl_branch_name(99), "branch 99");
        for within in 3..=10 {
            assert!(mkl_branch_within_avx2(within), "{within}");
        }
        for above in [-1, 0, 12, 14, 99] {
            assert!(!mkl_branch_within_avx2(above), "{above}");
        }
    }

    fn agrees_with_a_plain_product(blas: &Blas) {
        let (m, k, n) = (7, 13, 5);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
        let mut b = vec![0f32; k * n];
        for j in 0..n {
            for p in 0..k {
                b[p * n + j] = bt[j * k + p];
            }
        }
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
            }
        }
        let mut c = vec![f32::NAN; m * n];
        assert!(blas.sgemm(&a, &bt, &mut c, m, k, n, true));
        assert_eq!(c, want, "a · btᵀ");
        let mut c = vec![f32::NAN; m * n];
        assert!(blas.sgemm(&a, &b, &mut c, m, k, n, false));
        assert_eq!(c, want, "a · b");
        // Into a fresh buffer that is not zero-filled first, twice (the second allocation may reuse the first's memory).
        for _ in 0..2 {
            assert_eq!(blas.sgemm_new(&a, &bt, m, k, n, true).as_deref(), Some(&want[..]), "new a · btᵀ");
            assert_eq!(blas.sgemm_new(&a, &b, m, k, n, false).as_deref(), Some(&want[..]), "new a · b");
        }
        // aᵀ stored [k, m], α = 2, accumulated into c at β = 1: c = want + 2 · want.
        let mut at = vec![0f32; k * m];
        for i in 0..m {
            for p in 0..k {
                at[p * m + i] = a[i * k + p];
            }
        }
        let mut c = want.clone();
        assert!(blas.product_into(Product::new(m, n, k).at().bt().scaled(2.0), &at, &bt, 1.0, &mut c));
        assert_eq!(c, want.iter().map(|w| 3.0 * w).collect::<Vec<_>>(), "c + 2 · aᵀᵀ · btᵀ");
        assert!(!blas.product_into(Product::new(m, n, k), &a, &b, 1.0, &mut c[1..]), "a c of the wrong size");
        assert_eq!(
            blas.sgemm_new(&a, &b, m, k + 1, n, false),
            None,
            "operands of the wrong size are refused"
        );
    }
}
