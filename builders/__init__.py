"""Builds Triton model-repository entries from Hugging Face models."""
