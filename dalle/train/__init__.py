"""Training: the engine every model trains through, its back ends (one process, DDP, DeepSpeed), training
checkpoints, config files and the training command line. Tasks (tasks/) tell the engine what a model's
loss and evaluation are. The model packages (dvae, dalle.transformer, dalle.reranker) never import this."""
