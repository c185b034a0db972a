"""Deployment: exports of a trained model, each checked against it, and the runtimes that run them.

- ``export``: ``export_checked``, every format (Paddle, ONNX, OpenVINO fp32/int8, PaddleX) checked against
  the dygraph model before it is handed out; ``static_graph``: the static model and its deploy.yaml;
  ``legacy_program``: the legacy model.pdmodel;
- ``exported``: ``ExportedSegmenter``, an exported folder behind the Segmenter interface (flips, scales and
  sliding windows as for the dygraph model, on a logits export);
  ``paddle_inference`` (CPU and GPU) and ``runtimes`` (ONNX Runtime, OpenVINO) run its graph;
- ``backends``: ``load_exported``, which runtime runs which format.
"""
