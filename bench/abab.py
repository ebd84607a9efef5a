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


def run(cmd, out=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
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
    text = run([peer_py, "bench/torch_peer.py", model])
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
               "isa": best_dec.get("isa"), "blas": best_dec.get("blas")}, f, indent=2)
print(json.dumps(summary, indent=2))
