"""Data-holder side: load private data, compute a clipped, noised, masked contribution."""
