#!/usr/bin/env python3
"""Write a PEFT LoRA adapter directory by hand, from PEFT's documented on-disk layout, without peft or torch.

What `PeftModel.save_pretrained(dir)` writes for a LoRA on a Llama-architecture `AutoModelForCausalLM`:
- `adapter_config.json`: the `LoraConfig` fields (peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
  target_modules, layers_to_transform, base_model_name_or_path, ...), keys sorted as `json.dumps(sort_keys=True)`.
- `adapter_model.safetensors`: one tensor per LoRA matrix named
  `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight` (the adapter name "default" is
  stripped on save), lora_A shaped [r, in_features], lora_B [out_features, r], metadata {"format": "pt"}.

Shapes are those of steer-heal's tiny Llama (hidden 64, 4 heads x 16, 2 KV heads, intermediate 128). The values are
a fixed pattern so a loader can be checked element by element. Run: python3 make_fixture.py (stdlib only).
"""
import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
R, ALPHA, LAYERS = 4, 8, [0, 1, 2]
HIDDEN, INTER, Q_OUT, KV_OUT = 64, 128, 64, 32
SHAPES = {  # projection -> (module, out_features, in_features)
    "q_proj": ("self_attn", Q_OUT, HIDDEN),
    "k_proj": ("self_attn", KV_OUT, HIDDEN),
    "v_proj": ("self_attn", KV_OUT, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, Q_OUT),
    "gate_proj": ("mlp", INTER, HIDDEN),
    "up_proj": ("mlp", INTER, HIDDEN),
    "down_proj": ("mlp", HIDDEN, INTER),
}


def value(layer: int, k: int, half: str, i: int) -> float:
    """The fixture's element i of the layer's k-th projection's lora_A / lora_B (exact in f32)."""
    base = 0.001 * (1 + layer) * (1 + k)
    return base * ((i % 5) - 2) if half == "A" else base * ((i % 3) - 1) * 0.5


def main() -> None:
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": "layers",
        "layers_to_transform": LAYERS,
        "loftq_config": {},
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": R,
        "rank_pattern": {},
        "revision": None,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (HERE / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tensors = []  # (name, shape, floats)
    for layer in LAYERS:
        for k, (proj, (module, out_f, in_f)) in enumerate(SHAPES.items()):
            stem = f"base_model.model.model.layers.{layer}.{module}.{proj}"
            a = [value(layer, k, "A", i) for i in range(R * in_f)]
            b = [value(layer, k, "B", i) for i in range(out_f * R)]
            tensors.append((f"{stem}.lora_A.weight", [R, in_f], a))
            tensors.append((f"{stem}.lora_B.weight", [out_f, R], b))
    tensors.sort(key=lambda t: t[0])
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape, vals in tensors:
        blob = struct.pack(f"<{len(vals)}f", *vals)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    with open(HERE / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for blob in blobs:
            f.write(blob)
    (HERE / "tensor_names.txt").write_text("".join(t[0] + "\n" for t in tensors))


if __name__ == "__main__":
    main()
