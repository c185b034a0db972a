"""The Segmenter of an exported folder (deploy.yaml): preprocessing, labels at each image's size; the
runtimes that run its graph subclass it (``paddle_inference``, ``runtimes``; ``backends.load_exported``
picks one)."""
import numpy as np
import paddle

from emanet.deploy.static_graph import read_deploy_config
from emanet.errors import InvalidInput
from emanet.segmenter import Segmenter, build_transforms, undo_transforms
from emanet.test_time import InferenceOptions

# Which test-time options each output of an export supports: only logits can be averaged as the
# dygraph model averages them (PaddleSeg averages logits, not probabilities, over flips, scales and windows).
OPTIONS_OF_OUTPUT = {'none': 'flips, scales and sliding windows', 'softmax': 'none', 'argmax': 'none'}


class ExportedSegmenter(Segmenter):
    """Label maps from an exported model (a folder with deploy.yaml); ``load_exported`` picks the runtime.

    Single images go through the deploy config's transforms (the config's val transforms at export
    time); labels come back at each image's own size. An 'argmax' export's labels are resized back
    by nearest neighbour; 'softmax'/'none' exports resize the scores first, as the dygraph model does.
    ``options`` (flips, scales, sliding windows) run exactly as for the dygraph model, on a 'none'
    (logits) export. Subclasses run the graph (``infer``): Paddle Inference, ONNX Runtime or OpenVINO.
    """

    backend = None

    def __init__(self, deploy_path, options=None):
        self.deploy = read_deploy_config(deploy_path)
        self.output_op = self.deploy['output_op']
        self.num_classes = self.deploy.get('num_classes')
        self.input_shape = self.deploy.get('input_shape') or [None] * 4  # None: any size
        self.transforms = build_transforms(self.deploy['transforms'])
        self.options = options or InferenceOptions()
        if self.options.augmented and self.output_op != 'none':
            raise InvalidInput(f"{deploy_path} was exported with --output_op {self.output_op}, which cannot average "
                               "scores over flips, scales or sliding windows as the dygraph model does; export "
                               "with --output_op none (logits, the default) to use them")

    def infer(self, batch):
        """The graph's output for a contiguous float32 batch [N, 3, h, w]."""
        raise NotImplementedError

    def run(self, batch):
        """The model's raw output for a preprocessed batch [N, 3, h, w] (numpy or Tensor)."""
        batch = np.asarray(batch.numpy() if isinstance(batch, paddle.Tensor) else batch)
        if any(size not in (None, -1) and size != actual for size, actual in zip(self.input_shape, batch.shape)):
            raise InvalidInput(f"the model was exported for input {self.input_shape}, got {list(batch.shape)} after "
                             "preprocessing; add a Resize transform or export without --input_shape")
        return self.infer(np.ascontiguousarray(batch, dtype=np.float32))

    def forward(self, images):
        if self.output_op == 'argmax':
            raise InvalidInput("this model was exported with output_op argmax: it gives labels, not scores "
                             "(export with --output_op none or softmax for scores)")
        return paddle.to_tensor(self.run(images))

    def labels(self, images, trans_info):
        if self.output_op != 'argmax':
            return super().labels(images, trans_info)
        labels = paddle.to_tensor(self.run(images)[:, None].astype(np.float32))  # [N, 1, h, w]
        return undo_transforms(labels, trans_info, labels=True)[:, 0].numpy().astype(np.int32)
