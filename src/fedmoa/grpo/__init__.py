"""Critic-free GRPO: rollouts, group advantages, the clipped surrogate, and the local loop."""
