"""Weight quantization."""
