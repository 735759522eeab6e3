"""Named profiles of the simulated engine: one GPU and model each.

`l40s-llama-3.1-8b-fp8`: Llama-3.1-8B with FP8 weights and FP8 KV cache on one 48 GB L40S,
as TensorRT-LLM runs it.

- KV capacity: 48 GB less ~8.5 GB of FP8 weights and activations leaves ~37 GB; TensorRT-LLM
  gives 0.9 of free memory to the KV cache (~33 GB); at 64 KiB per token (32 layers x 8 KV
  heads x 128 dims x K and V x 1 byte) that is ~500,000 tokens.
- max_batch_size 256 and max_num_tokens 8192: trtllm-bench's settings for the tables below.
- The four coefficients are fitted by scripts/fit_simulated_profile.py (least squares on
  relative error) to NVIDIA's published TensorRT-LLM throughput for Llama-3.1-8B FP8 on one
  L40S, output tokens/s (TensorRT-LLM performance overview, v0.17, input/output tokens):
  128/128 9,105; 128/2048 5,366; 500/2000 4,274; 1000/1000 4,055; 2048/128 1,067;
  2048/2048 2,225. PUBLISHED holds them; tests/test_simulated_engine.py checks each
  shape within ±15%.
"""

from __future__ import annotations

from batchinfer.engines.simulated.model import Profile

PUBLISHED = {  # (input, output) tokens -> output tokens/s, TensorRT-LLM v0.17, one L40S
    "l40s-llama-3.1-8b-fp8": {(128, 128): 9105, (128, 2048): 5366, (500, 2000): 4274,
                              (1000, 1000): 4055, (2048, 128): 1067, (2048, 2048): 2225},
}
CALIBRATION_REQUESTS = 1000
"""Requests per shape when fitting and checking a profile (all waiting at time 0)."""

PROFILES = {
    "l40s-llama-3.1-8b-fp8": Profile(
        name="l40s-llama-3.1-8b-fp8", kv_cache_tokens=500_000, max_batch_size=256, max_num_tokens=8192,
        max_model_len=8192,
        # Fitted by scripts/fit_simulated_profile.py; simulated/published: 128/128 0.993,
        # 128/2048 1.034, 500/2000 1.004, 1000/1000 0.972, 2048/128 1.011, 2048/2048 0.991.
        base_s=0.009814, prefill_s_per_token=4.059e-05, decode_s_per_seq=1.1e-05,
        attn_s_per_ctx_token=1.021e-07),
}


def get(name: str) -> Profile:
    """The profile called `name`; ValueError listing the known ones otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown simulated profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]
