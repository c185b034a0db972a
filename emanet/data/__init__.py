"""Data: datasets (Cityscapes paired by file name, VOC, the drawn quick-start street scenes), their preparation, and loading for training and evaluation."""
