"""A readable long-context Llama engine with a KV-cache policy per layer. The public API:

    from engine import LLM, Plan
    llm = LLM()
    print(llm.generate("The capital of France is", max_new_tokens=8).text)

See engine/api.py; the CLIs (generate.py, profile_layers.py, bench.py) are built on it."""
from engine.api import LLM, Output, Stream
from engine.plan import Plan

__all__ = ["LLM", "Output", "Plan", "Stream"]
