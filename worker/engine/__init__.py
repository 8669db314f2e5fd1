"""The engine: one protocol, the echo engine and the LLM engine with its scheduler, sampler, budget and kernels."""
