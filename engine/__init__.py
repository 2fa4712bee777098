"""Run-time inference: KV cache, sampling, detokenization, the batched generation loop."""
