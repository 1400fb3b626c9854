"""Weight-only and KV-cache quantization."""
