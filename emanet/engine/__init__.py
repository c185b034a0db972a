"""Training, evaluation and inference engine for Paddle 3.x.

- ``trainer``: ``train(cfg, hooks=..., checkpointer=...)``, the training loop (optimization, AMP,
  data parallelism, a checkpoint every save interval);
- ``hooks``: what runs at fixed points of that loop (the [TRAIN] line, evaluation, best_model/,
  VisualDL, attention pictures); adding a feature to training is adding a ``HookBase``;
- ``checkpointer``: ``Checkpointer``, the one owner of checkpoints (save, latest, best, keep-N, resume);
- ``evaluate``: the one evaluation loop; ``metrics``: the confusion matrix and mIoU;
- ``inference``: ``ModelSegmenter``, the dygraph model as a Segmenter; ``predict``: the one image loop
  (reading and writing in threads beside the model);
- ``distributed``: what data-parallel processes share and how they stop together;
- ``attention``: the EM unit's responsibilities and bases, and their pictures.
"""
