"""Fused tensor operations (pure torch)."""

from egspo.ops.fused_logprobs import fused_logprobs_entropy

__all__ = ["fused_logprobs_entropy"]
