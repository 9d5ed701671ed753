"""The networks' home: every network of the course, one module per family (mlp, unet, classifier, autoencoder); checkpoints find them here by class name."""
