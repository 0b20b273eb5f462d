"""The CLIP-style reranker (paper sec. 2.5): model.py the two encoders, score.py scoring and keeping
the best candidates."""
