"""VLMs exported in parts with a static image-token layout (LLaVA): vision + outer pruning, LM prefill, LM decode."""
