"""One task per model: its data, loss, evaluation and objective config, for the shared engine."""
