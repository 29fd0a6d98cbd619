"""One flat train(config, workdir) per algorithm."""
