"""PyTorch reimplementation of DALL-E."""
