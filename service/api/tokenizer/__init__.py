"""vLLM's tokenizer endpoints: /tokenize, /detokenize and /tokenizer_info (what lm-eval's remote tokenizer reads)."""
