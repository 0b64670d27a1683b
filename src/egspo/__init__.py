"""egspo: hybrid SFT + RL post-training with entropy-gated selective policy optimization."""

__version__ = "0.1.0"
