"""Run our throughput benchmarks and the PyTorch peer interleaved, A B A B: the same number of repetitions each,
so that both see the same machine (other load, turbo, thermal state) on average. Writes per-repetition files, the
best of each benchmark in the files bench/report.py reads (decode.json, heal.json, peer.json), and abab.json with
every repetition plus the best and median of both sides.

Usage: python3 bench/abab.py MODEL "DECODE_BENCH_COMMAND" STEER_HEAL_BINARY PEER_PYTHON [REPS]   (`just bench`);
an empty PEER_PYTHON runs ours only (bench/report.py then quotes the peer's published figures, marked as such)."""
import json
import os
import shlex
import statistics
import subprocess
import sys

model, decode_bin, steer_bin, peer_py = sys.argv[1:5]
reps = int(sys.argv[5]) if len(sys.argv) > 5 else 2
d = "bench"
runs = {"ours": [], "peer": []}


# When our kernels are capped below what the CPU has (STEER_HEAL_ISA), the peer is capped the same way, so that a
# table labelled AVX2 compares AVX2 with AVX2 on an AVX-512 machine too: ATen's vectorised kernels, MKL's BLAS and
# oneDNN each have their own switch.
PEER_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "DNNL_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "DNNL_MAX_CPU_ISA": "SSE41"},
}
peer_caps = PEER_CAPS.get(os.environ.get("STEER_HEAL_ISA", "auto").strip().lower(), {})


def run(cmd, out=None, extra_env=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, **(extra_env or {}))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"bench/abab.py: {cmd[0]} failed with exit code {r.returncode}")
    if out:
        with open(out, "w") as f:
            f.write(r.stdout)
    return r.stdout


def ours(i):
    dec, heal = f"{d}/decode-{i}.json", f"{d}/heal-{i}.json"
    run(shlex.split(decode_bin) + ["--model", model, "--out", dec])
    run(["/usr/bin/time", "-f", "%M", "-o", f"{d}/heal.rss", steer_bin, "bench-heal", "--model", model, "--out", heal,
         "--seq-len", "128", "--prompt-len", "1", "--steps", "3", "--batch", "4", "--layers-from", "0",
         "--layers-to", "1", "--compare-composite"])
    with open(dec) as f:
        dj = json.load(f)
    with open(heal) as f:
        hj = json.load(f)
    by = {(r["implementation"], r["batch"]): r["tokens_per_s"] for r in dj["results"]}
    return {"decode_tok_s_b1": by.get(("steer-heal", 1)), "decode_tok_s_b16": by.get(("steer-heal", 16)),
            "train_tok_s_with_ref": hj["tokens_per_s"], "train_tok_s": hj["tokens_per_s_without_reference"],
            "_decode": dj, "_heal": hj}


def peer(i):
    text = run([peer_py, "bench/torch_peer.py", model], extra_env=peer_caps)
    p = json.loads(text.strip().splitlines()[-1])
    with open(f"{d}/peer-{i}.json", "w") as f:
        json.dump(p, f)
    return p


for i in range(reps):
    runs["ours"].append(ours(i))
    if peer_py:
        runs["peer"].append(peer(i))

keys = ["decode_tok_s_b1", "decode_tok_s_b16", "train_tok_s_with_ref", "train_tok_s"]
summary = {}
for side in ("ours", "peer"):
    summary[side] = {}
    for k in keys:
        vals = [r[k] for r in runs[side] if r.get(k) is not None]
        summary[side][k] = {"values": vals, "best": max(vals) if vals else None,
                            "median": statistics.median(vals) if vals else None}
# The best repetition of each of our benchmarks, in the files report.py reads.
best_dec = max(runs["ours"], key=lambda r: r["decode_tok_s_b16"] or 0)["_decode"]
best_heal = max(runs["ours"], key=lambda r: r["train_tok_s_with_ref"] or 0)["_heal"]
with open(f"{d}/decode.json", "w") as f:
    json.dump(best_dec, f, indent=2)
with open(f"{d}/heal.json", "w") as f:
    json.dump(best_heal, f, indent=2)
if runs["peer"]:
    peer_best = {k: summary["peer"][k]["best"] for k in keys}
    peer_best.update({k: v for k, v in runs["peer"][-1].items() if k not in keys})
    with open(f"{d}/peer.json", "w") as f:
        json.dump(peer_best, f)
else:
    summary["peer"] = {}
    if os.path.exists(f"{d}/peer.json"):
        os.remove(f"{d}/peer.json")
with open(f"{d}/abab.json", "w") as f:
    json.dump({"order": "ours, peer, repeated", "reps": reps, "summary": summary,
               "isa": best_dec.get("isa"), "blas": best_dec.get("blas"), "peer_caps": peer_caps}, f, indent=2)
print(json.dumps(summary, indent=2))
