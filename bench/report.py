"""Collect the JSON of every steer-heal benchmark in bench/ into bench/results.json (and bench/results-<ISA>.json,
one per instruction set the kernels ran with) and a markdown table per ISA in bench/README.md, with ratios against the PyTorch peer (bench/peer.json when `just bench` ran the peer in the same
run, else the peer's published figures, marked as coming from another run), the machine, date and commit.

Usage: python3 bench/report.py BENCH_DIR   (called by `just bench`)."""
import datetime
import json
import os
import subprocess
import sys

# Figures the peer script gave on a 2-core AMD EPYC like ours (quoted when the peer could not run here).
PUBLISHED_PEER = {
    "decode_tok_s_b1": 14.4,
    "decode_tok_s_b16": 132.0,
    "train_tok_s": 158.0,
    "train_tok_s_with_ref": 102.0,
    "source": "published figures from another run (2-core AMD EPYC, 2026-11-25), not measured in this run",
}


def load(d, name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        text = f.read().strip()
    # bench-tui prints other lines before its JSON; take the last JSON object.
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.rfind("\n{")
        return json.loads(text[start + 1 :]) if start >= 0 else None


def rss(d, name):
    p = os.path.join(d, name)
    try:
        with open(p) as f:
            return round(int(f.read().split()[-1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None


def machine():
    cpu, cores = "unknown", 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("processor"):
                    cores += 1
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": cores}


def commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        # The benchmark outputs under bench/ are rewritten by the run itself: only other changes make it dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
                               capture_output=True, text=True, check=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "bench"
    decode, heal, steer, tui, ev = (load(d, n) for n in ("decode.json", "heal.json", "steer.json", "tui.json",
                                                         "eval.json"))
    peer = load(d, "peer.json")
    peer_src = "measured in this run (bench/torch_peer.py"
    if peer is not None and peer.get("cpu_capability"):
        peer_src += f", ATen ISA {peer['cpu_capability']}"
    peer_src += ")"
    if peer is None:
        peer, peer_src = PUBLISHED_PEER, PUBLISHED_PEER["source"]
    rows = []  # (benchmark, ours, unit, peer, ratio, peak MiB)

    def ratio(a, b):
        return round(a / b, 2) if a is not None and b else None

    abab = load(d, "abab.json")
    spread = (abab or {}).get("summary", {})

    def med(side, key):
        return spread.get(side, {}).get(key, {}).get("median")

    def best(side, key, fallback):
        # With A B A B repetitions, each benchmark's own best (the files hold one repetition's numbers).
        b = spread.get(side, {}).get(key, {}).get("best")
        return fallback if b is None else b

    if decode:
        by = {(r["implementation"], r["batch"]): r["tokens_per_s"] for r in decode["results"]}
        for b, key in ((1, "decode_tok_s_b1"), (16, "decode_tok_s_b16")):
            ours = best("ours", key, by.get(("steer-heal", b)))
            cand = by.get(("candle-transformers llama", b))
            rows.append({"benchmark": f"greedy decode, batch {b}", "ours": ours, "unit": "tokens/s",
                         "peer": peer.get(key), "ratio_vs_peer": ratio(ours, peer.get(key)),
                         "candle_transformers": cand,
                         # Against candle-transformers: the same repetition's pair (one process, interleaved).
                         "ratio_vs_candle_transformers": ratio(by.get(("steer-heal", b)), cand),
                         "ours_median": med("ours", key), "peer_median": med("peer", key),
                         "ratio_of_medians": ratio(med("ours", key), med("peer", key)),
                         "peak_rss_mib": decode.get("peak_rss_mib")})
    if heal:
        for key, ours, label in (("train_tok_s_with_ref", best("ours", "train_tok_s_with_ref", heal["tokens_per_s"]),
                                  "LoRA + KL-barrier training"),
                                 ("train_tok_s", best("ours", "train_tok_s", heal["tokens_per_s_without_reference"]),
                                  "LoRA training without the reference pass")):
            rows.append({"benchmark": label, "ours": ours, "unit": "tokens/s", "peer": peer.get(key),
                         "ratio_vs_peer": ratio(ours, peer.get(key)), "ours_median": med("ours", key),
                         "peer_median": med("peer", key), "ratio_of_medians": ratio(med("ours", key), med("peer", key)),
                         "peak_rss_mib": heal.get("peak_rss_mib")})
        comp = heal.get("composite")
        if comp:
            ours = comp["tokens_per_s"]
            rows.append({"benchmark": "LoRA + KL-barrier training, composite path (candle's differentiable ops only, "
                                      "same run)", "ours": ours, "unit": "tokens/s",
                         "peer": peer.get("train_tok_s_with_ref"),
                         "ratio_vs_peer": ratio(ours, peer.get("train_tok_s_with_ref")),
                         "peak_rss_mib": heal.get("peak_rss_mib")})
    # Wall-clock targets of issue 7 (lower is better), each with its target.
    if steer and steer.get("dose_wall_s") is not None:
        rows.append({"benchmark": f"iso-KL calibration ({steer.get('dose_evaluations')} evaluations)",
                     "ours": steer["dose_wall_s"], "unit": "s", "target": "< 60 s",
                     "peak_rss_mib": rss(d, "steer.rss")})
    if ev and ev.get("timings"):
        t, cfg = ev["timings"], ev.get("config", {})
        n = ev.get("metrics", {}).get("n_rows") or len(ev.get("rows", []))
        rows.append({"benchmark": f"tinymfv {cfg.get('variant')} eval (n = {n}, think {cfg.get('think_tokens')})",
                     "ours": t["total_s"], "unit": "s", "target": "< 600 s", "peak_rss_mib": rss(d, "eval.rss")})
    if tui and tui.get("startup_best_ms") is not None:
        rows.append({"benchmark": f"TUI start-up to first frame (existing session, {tui.get('startup_session_rows')}"
                                  " completions)", "ours": tui["startup_best_ms"], "unit": "ms",
                     "target": "< 1000 ms", "peak_rss_mib": rss(d, "tui.rss")})
        rows.append({"benchmark": "TUI worst key-to-frame while generating", "ours": tui["worst_key_to_frame_ms"],
                     "unit": "ms", "target": "< 16 ms", "peak_rss_mib": rss(d, "tui.rss")})
    if steer:
        rows.append({"benchmark": "steered decode (bench-steer)", "ours": steer, "unit": "see JSON",
                     "peak_rss_mib": rss(d, "steer.rss")})
    if tui:
        rows.append({"benchmark": "TUI latency while generating (bench-tui)", "ours": tui, "unit": "see JSON",
                     "peak_rss_mib": rss(d, "tui.rss")})
    isa = (decode or {}).get("isa") or "unknown"
    detected = (decode or {}).get("isa_detected")
    # A table per ISA the kernels ran with, and per CPU they ran on: AVX2 capped on an AVX-512 CPU is its own
    # table, not the AVX2 CPU's.
    key = isa if not detected or detected == isa else f"{isa}-on-{detected}"
    rnd = load(d, "turnaround.json")
    # The turnaround is quoted only in the table of the ISA (and CPU) it was measured with (a file without
    # isa_detected predates capping: it ran at its CPU's own ISA).
    if rnd and (rnd.get("isa"), rnd.get("isa_detected", rnd.get("isa"))) != (isa, detected or isa):
        rnd = None
    if rnd and rnd.get("turnaround"):
        t = rnd["turnaround"]
        rows.append({"benchmark": "round turnaround (gate Q0 → next round's first completions; `just bench-round`)",
                     "ours": t["total_s"], "unit": "s", "target": "< 300 s", "stages": t["stages"],
                     "base_eval_s": t.get("base_eval_s"), "peak_rss_mib": None})
    results = {
        "isa": isa,
        "table": key,
        "isa_detected": (decode or {}).get("isa_detected"),
        "cpu_features": (decode or {}).get("cpu_features"),
        "blas": (decode or {}).get("blas"),
        "abab_reps": (abab or {}).get("reps"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        "peer": peer,
        "peer_source": peer_src,
        "bandwidth": None if not decode else {
            "read_bandwidth_gb_s": decode.get("read_bandwidth_gb_s"),
            "weight_bytes_per_token": decode.get("weight_bytes_per_token"),
            "batch1_bound_tokens_per_s": decode.get("batch1_bandwidth_bound_tokens_per_s"),
            "ours_batch1_fraction_of_bound": decode.get("ours_batch1_fraction_of_bound"),
            "ours_weight_bytes_per_token": decode.get("ours_weight_bytes_per_token"),
            "ours_batch1_bound_tokens_per_s": decode.get("ours_batch1_bandwidth_bound_tokens_per_s"),
            "ours_batch1_fraction_of_own_bound": decode.get("ours_batch1_fraction_of_own_bound"),
        },
        "rows": rows,
    }
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(d, f"results-{key}.json"), "w") as f:
        json.dump(results, f, indent=2)
    # One section per ISA measured: this run's first, then the others' latest files.
    sections = [results]
    for name in sorted(os.listdir(d)):
        if name.startswith("results-") and name.endswith(".json") and name != f"results-{key}.json":
            with open(os.path.join(d, name)) as f:
                sections.append(json.load(f))
    lines = ["# Benchmarks", "", "One table per instruction set the kernels ran with (`STEER_HEAL_ISA` caps it; "
             "bench/PROFILE.md). Ratios compare numbers measured side by side in one run only.", ""]
    for i, r in enumerate(sections):
        lines += render(r, detail=(i == 0))
    lines += ["", "Timings on a shared machine are noisy; ratios within one run are what to compare."]
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def fmt(x):
    return "–" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))


def render(results, detail):
    rows, peer_src, m = results["rows"], results["peer_source"], results["machine"]
    isa = results.get("isa", "unknown")
    title = isa.upper()
    if results.get("isa_detected") and results["isa_detected"] != isa:
        title += f" (capped, on an {results['isa_detected'].upper()} CPU)"
    lines = [f"## {title} — {results['date'][:10]}, commit `{results['commit']}`", "",
             f"`just bench` on {m['cpu']} ({m['logical_cores']} logical cores), kernels at ISA `{isa}`"
             + (f" (CPU: `{results.get('isa_detected')}`; features {', '.join(results.get('cpu_features') or [])})"
                if results.get("isa_detected") else "")
             + (f"; large products by {results['blas']}" if results.get("blas") else "")
             + (f". {results['isa_note']}" if results.get("isa_note") else "")
             + f". Peer (PyTorch + transformers + peft, `bench/torch_peer.py`): {peer_src}"
             + (f", interleaved A B A B, {results['abab_reps']} repetitions each (best, and median in brackets)"
                if results.get("abab_reps") else "") + ".", ""]
    lines += ["| benchmark | ours | peer | ours / peer | candle-transformers | ours / candle-transformers | peak MiB |",
              "|---|---|---|---|---|---|---|"]

    def with_median(best, median):
        return fmt(best) + (f" ({fmt(median)})" if median is not None else "")

    for r in rows:
        if r["unit"] != "tokens/s":
            continue
        lines.append(f"| {r['benchmark']} | {with_median(r['ours'], r.get('ours_median'))} tok/s | "
                     f"{with_median(r.get('peer'), r.get('peer_median'))} | "
                     f"{with_median(r.get('ratio_vs_peer'), r.get('ratio_of_medians'))} | "
                     f"{fmt(r.get('candle_transformers'))} | "
                     f"{fmt(r.get('ratio_vs_candle_transformers'))} | {fmt(r.get('peak_rss_mib'))} |")
    timed = [r for r in rows if r["unit"] in ("s", "ms")]
    if timed:
        lines += ["", "| wall-clock | ours | target | peak MiB |", "|---|---|---|---|"]
        for r in timed:
            lines.append(f"| {r['benchmark']} | {fmt(float(r['ours']))} {r['unit']} | {r['target']} | "
                         f"{fmt(r.get('peak_rss_mib'))} |")
    for r in timed:
        if r.get("stages"):
            lines += ["", "Round turnaround by stage:", "", "| stage | s |", "|---|---|"]
            lines += [f"| {st['stage']} | {st['seconds']:.1f} |" for st in r["stages"]]
            if r.get("base_eval_s") is not None:
                lines.append(f"| (base eval, once per session, not counted) | {r['base_eval_s']:.1f} |")
    bw = results.get("bandwidth")
    if bw and bw.get("read_bandwidth_gb_s"):
        frac = bw.get("ours_batch1_fraction_of_bound")
        lines += ["", f"Memory-bandwidth bound at batch 1: {bw['weight_bytes_per_token'] / 1e9:.3f} GB of weights "
                  f"per token at a measured {bw['read_bandwidth_gb_s']:.1f} GB/s read bandwidth ⇒ "
                  f"{bw['batch1_bound_tokens_per_s']:.1f} tokens/s; ours reaches "
                  f"{'–' if frac is None else f'{100 * frac:.0f} %'} of it."]
        own = bw.get("ours_batch1_fraction_of_own_bound")
        if own is not None and bw.get("ours_weight_bytes_per_token"):
            lines += ["", f"Ours reads the GGUF's block codes in a decode step ({bw['ours_weight_bytes_per_token'] / 1e9:.3f} "
                      f"GB per token, the same values: `model::codes`), so its own bound is "
                      f"{bw['ours_batch1_bound_tokens_per_s']:.1f} tokens/s, of which it reaches {100 * own:.0f} %: "
                      f"at batch 1 it is bound by the dequantisation and the dot products, not by memory."]
    if detail:
        for r in rows:
            if r["unit"] == "see JSON":
                lines += ["", f"### {r['benchmark']} (peak {fmt(r.get('peak_rss_mib'))} MiB)", "", "```json",
                          json.dumps(r["ours"], indent=2), "```"]
    return lines + [""]


if __name__ == "__main__":
    main()
