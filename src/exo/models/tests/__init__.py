"""Tests for model loading, the tokenizer and the MLX Llama stages."""
