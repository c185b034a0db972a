"""Deployment: export a trained model to a static graph and run it with Paddle Inference."""
