"""Bridges to other frameworks, one module each, imported only by whoever uses it.

- ``paddlex``: EMANet in PaddleX 3 (its ``create_model``, semantic-segmentation pipeline and serving),
  and the model folder PaddleX reads (``tools/export.py --format paddlex``).
"""
