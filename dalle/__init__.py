"""DALL-E (Ramesh et al. 2021) in PyTorch.

    dvae/               stage 1: image <-> grid of codebook tokens          (a package of its own)
    dalle.transformer   stage 2: the transformer, its masks, cached decoding and sampling
    dalle.reranker      the CLIP-style reranker
    dalle.pipeline      loads a transformer with its tokenizer, dVAE and reranker
    dalle.generation    prompt -> ranked images, one call
    dalle.data          data readers, the shapes world, pre-tokenised shards
    dalle.train         the engine, its back ends, checkpoints, tasks (imports the models, never the reverse)
    dalle.evaluation    detector, compositional accuracy, FID
"""
