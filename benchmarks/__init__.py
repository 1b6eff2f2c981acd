"""In-process benchmarks of the engine and the server; each writes JSON (`fastserve bench`)."""
