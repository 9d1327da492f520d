"""Coordinator side: rounds, secure-sum unmasking, releases, steered generation."""
