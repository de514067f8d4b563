"""Model loading and the locally built files a model needs (configs, tokenizer)."""
