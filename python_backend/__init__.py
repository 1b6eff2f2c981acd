"""The Triton Python-backend model and the engine it runs."""
