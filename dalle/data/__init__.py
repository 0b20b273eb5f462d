"""Data sets, readers and transforms for DALL-E training."""
