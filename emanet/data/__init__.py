"""Data: datasets (``cityscapes``: paired by file name; ``voc``; ``dataset``: PaddleSeg's list-file dataset
with its files checked; ``street_scenes``: the quick start's drawn scenes, ``scene_painter`` draws them),
their preparation (``prepare_cityscapes``, ``prepare_voc``), and ``loading`` for training and evaluation
(resumable sampling, each sample checked, ``running_loader``)."""
