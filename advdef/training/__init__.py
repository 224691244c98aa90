"""Adversarial-training methods and the training loop."""
