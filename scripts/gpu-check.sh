#!/usr/bin/env bash
# The prepared GPU check: run on a machine with NVIDIA's driver, CUDA 13 and python3 with torch, transformers and
# peft, but no Rust and no network. It takes the binary `just build-cuda` made here and a model, and writes
# everything to OUT (default $OUT, else ./gpu-check-out):
#   parity.json     CUDA vs CPU: greedy tokens of f32 identical for 32 tokens; bf16 logprob gap (stated tolerance)
#   round.log       one short headless round on CUDA (extract → dose → generate → gate Q0 → heal → bake → eval)
#   decode-bN.json  our decode tokens/s at batch 1, 16, 64 (bf16), with the peak GPU memory seen
#   heal.json       our LoRA r32 + KL-reference training tokens/s (bf16, 4 × 128)
#   peer.json       PyTorch bf16 on the same GPU: decode at 1, 16, 64 and LoRA + KL training
#   summary.md      the ratios and peak memory, for bench/
# Usage: scripts/gpu-check.sh BIN MODEL.gguf   (meant to finish in well under 8 minutes on one GPU)
set -uo pipefail
bin=${1:?binary built with --features cuda}
model=${2:?model .gguf}
out=${OUT:-gpu-check-out}
mkdir -p "$out"
log() { echo "gpu-check: $*" | tee -a "$out/summary.md" >&2; }
: > "$out/summary.md"

# The binary links the CUDA 13 libraries dynamically: use torch's copies when the system has none on its path.
libs=$(python3 - <<'EOF'
import glob, os, importlib.util
s = importlib.util.find_spec("nvidia")
roots = list(s.submodule_search_locations) if s else []
dirs = sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# Peak GPU memory of one command: poll nvidia-smi while it runs (MiB, whole device).
peak() {
  local f=$1; shift
  ( while sleep 0.2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done ) > "$f.mem" &
  local poll=$!
  "$@"; local rc=$?
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  sort -n "$f.mem" | tail -1 > "$f.peak"; rm -f "$f.mem"
  return $rc
}

log "parity: greedy tokens, CPU f32 vs CUDA f32 vs CUDA bf16 (32 tokens)"
prompt="Tell me a short story about a brave nurse."
"$bin" --device cpu --dtype f32 chat --model "$model" --max-new-tokens 32 --json "$prompt" > "$out/cpu.json" || log "FAIL cpu chat"
"$bin" --device cuda --dtype f32 chat --model "$model" --max-new-tokens 32 --json "$prompt" > "$out/cuda-f32.json" || log "FAIL cuda f32 chat"
"$bin" --device cuda --dtype bf16 chat --model "$model" --max-new-tokens 32 --json "$prompt" > "$out/cuda-bf16.json" || log "FAIL cuda bf16 chat"
python3 - "$out" <<'EOF' | tee -a "$out/summary.md"
import json, sys, os
o = sys.argv[1]
def load(n):
    try: return json.load(open(os.path.join(o, n)))
    except Exception as e: return None
cpu, f32, bf16 = load("cpu.json"), load("cuda-f32.json"), load("cuda-bf16.json")
res = {}
if cpu and f32:
    res["f32_tokens_identical"] = cpu["tokens"][:32] == f32["tokens"][:32]
    res["f32_max_logprob_gap"] = max(abs(a - b) for a, b in zip(cpu["logprobs"], f32["logprobs"]))
if cpu and bf16:
    n = next((i for i, (a, b) in enumerate(zip(cpu["tokens"], bf16["tokens"])) if a != b), len(cpu["tokens"]))
    res["bf16_tokens_agreeing"] = n
    # Stated tolerance: bf16 weights give logprobs of the same tokens within 0.5 nats over the agreeing prefix.
    gaps = [abs(a - b) for a, b in zip(cpu["logprobs"][:n], bf16["logprobs"][:n])]
    res["bf16_max_logprob_gap"] = max(gaps) if gaps else None
    res["bf16_within_tolerance_0.5"] = bool(gaps) and max(gaps) <= 0.5
json.dump(res, open(os.path.join(o, "parity.json"), "w"), indent=1)
print("parity:", json.dumps(res))
EOF

log "one short headless round on CUDA"
sess=$(mktemp -d)/s
peak "$out/round" timeout 240 "$bin" --device cuda run --session "$sess" --model "$model" --rounds 1 --floor 0 \
  --n-prompts 2 --max-new-tokens 32 --extract-pairs 8 --eval-n 8 --think 16 > "$out/round.log" 2>&1 \
  && log "round: ok (peak $(cat "$out/round.peak") MiB)" || log "FAIL round (see round.log)"

for b in 1 16 64; do
  peak "$out/decode-b$b" "$bin" --device cuda --dtype bf16 bench-steer --model "$model" --batch $b --new-tokens 64 \
    --reps 2 --no-dose --out "$out/decode-b$b.json" > /dev/null 2>&1 || log "FAIL decode batch $b"
done
peak "$out/heal" "$bin" --device cuda --dtype bf16 bench-heal --model "$model" --out "$out/heal.json" --seq-len 128 \
  --prompt-len 1 --steps 3 --batch 4 --r 32 > /dev/null 2>&1 || log "FAIL heal bench"

log "PyTorch bf16 peer on the same GPU (the model converted to a Hugging Face directory by our binary)"
hf=$(mktemp -d)/hf
"$bin" convert "$model" "$hf" > /dev/null && \
  timeout 240 python3 bench/torch_peer.py "$hf" --device cuda --dtype bf16 --batches 1,16,64 > "$out/peer.json" \
  || log "FAIL peer"

python3 - "$out" <<'EOF' | tee -a "$out/summary.md"
import json, os, sys
o = sys.argv[1]
def j(n):
    try: return json.load(open(os.path.join(o, n)))
    except Exception: return {}
def pk(n):
    try: return open(os.path.join(o, n + ".peak")).read().strip() + " MiB"
    except Exception: return "?"
peer = j("peer.json")
print("| benchmark | steer-heal | PyTorch bf16 | ratio | peak GPU memory (ours) |")
print("|---|---|---|---|---|")
for b in (1, 16, 64):
    ours = j(f"decode-b{b}.json").get("plain_tok_s")
    theirs = peer.get(f"decode_tok_s_b{b}")
    r = f"{ours / theirs:.2f}×" if ours and theirs else "–"
    print(f"| greedy decode, batch {b} | {ours} | {theirs} | {r} | {pk(f'decode-b{b}')} |")
h = j("heal.json")
for key, pkey, name in (("tokens_per_s", "train_tok_s_with_ref", "LoRA r32 + KL reference, 4 × 128"),
                        ("tokens_per_s_without_reference", "train_tok_s", "LoRA r32 without the reference")):
    ours, theirs = h.get(key), peer.get(pkey)
    r = f"{ours / theirs:.2f}×" if ours and theirs else "–"
    print(f"| {name} | {ours} | {theirs} | {r} | {pk('heal')} |")
EOF
log "done: $out"
