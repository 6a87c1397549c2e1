"""Deterministic workflow code: the template model, the build saga and its status models."""
