"""Loading models (built-in names, HF directories, GGUF files) and finding their layers."""
