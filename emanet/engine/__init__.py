"""Training, evaluation and inference engine for Paddle 3.x."""
