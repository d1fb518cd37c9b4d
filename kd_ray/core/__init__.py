"""The pure-torch core: config, data, images and streamed rows, subsets, augmentation, models,
losses, ensemble inference and the training engine. Nothing here imports Ray (tests/test_layers.py
enforces it)."""
