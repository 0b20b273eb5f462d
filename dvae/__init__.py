"""Stage 1: the discrete VAE that turns an image into a grid of codebook tokens and back (paper sec. 2.1).
Imports nothing of the other packages."""
