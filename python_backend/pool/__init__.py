"""A pool of models behind one Triton entry, routed per request by expected quality and latency."""
