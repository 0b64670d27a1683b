"""Fused tensor operations (pure torch)."""

from egspo.ops.fused_logprobs import TokenScores, fused_logprobs_entropy

__all__ = ["TokenScores", "fused_logprobs_entropy"]
