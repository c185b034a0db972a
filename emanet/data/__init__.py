"""Datasets: a Cityscapes reader that pairs files by name, and the synthetic quick-start street scenes."""
