"""Model runners and model resolution: transformers models behind ``core.sides.CausalLM``, names to
paths (presets, local dirs, hub ids), tokenizer checks, and the embedded default pair."""
