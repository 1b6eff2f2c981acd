"""The decode loop: scheduler, KV cache, runner, sampler, detokenizer."""
