"""In an environment holding PaddleX and PaddleOCR, after this package was added to it: all three import,
and PaddleX and PaddleOCR still predict (offline, on model folders made here: no hub downloads).

- PaddleX semantic segmentation (`create_model`) runs this package's EMANet, exported as a PaddleX
  folder and registered (emanet.integrations.paddlex), and its labels equal this package's own predictor's.
- PaddleOCR text detection (`TextDetection`) runs a hand-made PP-OCRv5_mobile_det folder (one 1x1
  convolution marking bright pixels as text) and finds the one white box drawn on a black image.

Run by .ci/paddlex_check in its own virtual environment.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
import paddle
import paddleocr
import paddlex
import yaml
from paddleseg.models.backbones import ResNet18_vd

import emanet
from emanet.deploy.export import export_checked
from emanet.deploy.backends import load_exported
from emanet.integrations import paddlex as emanet_paddlex

HEIGHT, WIDTH = 128, 160
NORMALIZE = {'type': 'Normalize', 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}


def paddlex_segmentation_folder(work):
    """A tiny random EMANet exported by this package as the folder PaddleX reads (--format paddlex)."""
    paddle.seed(0)
    model = emanet.EMANet(5, ResNet18_vd(output_stride=8), ema_channels=16, gc_channels=16, num_bases=8)
    folder = work / 'EMANet-R18'
    image = np.random.RandomState(1).randint(0, 256, (HEIGHT, WIDTH, 3)).astype(np.float32)
    export_checked(model, str(folder), [NORMALIZE], preprocessed_images_of([image]), export_format='paddlex',
                   paddlex_name='EMANet-R18')
    return folder


def preprocessed_images_of(images):
    """Images [3, h, w] normalized as NORMALIZE does."""
    return [((image / 255 - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32) for image in images]


class BrightIsText(paddle.nn.Layer):
    """Text probability [N, 1, H, W]: high where the normalized image is bright."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 1, 1)
        paddle.assign(paddle.full([1, 3, 1, 1], 10 / 3), output=self.conv.weight)
        paddle.assign(paddle.zeros([1]), output=self.conv.bias)

    def forward(self, x):
        return paddle.nn.functional.sigmoid(self.conv(x))


def paddleocr_detection_folder(work):
    folder = work / 'PP-OCRv5_mobile_det'
    layer = BrightIsText()
    layer.eval()
    paddle.jit.save(layer, str(folder / 'inference'),
                    input_spec=[paddle.static.InputSpec([None, 3, None, None], 'float32', 'x')])
    (folder / 'inference.yml').write_text(yaml.safe_dump({
        'Global': {'model_name': 'PP-OCRv5_mobile_det'},
        'PreProcess': {'transform_ops': [
            {'DecodeImage': {'channel_first': False, 'img_mode': 'BGR'}},
            {'DetLabelEncode': None},
            {'DetResizeForTest': {'resize_long': 960}},
            {'NormalizeImage': {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225],
                                'scale': 1 / 255, 'order': 'hwc'}},
            {'ToCHWImage': None},
            {'KeepKeys': {'keep_keys': ['image', 'shape', 'polys', 'ignore_tags']}}]},
        'PostProcess': {'name': 'DBPostProcess', 'thresh': 0.3, 'box_thresh': 0.6, 'max_candidates': 1000,
                        'unclip_ratio': 1.5}}))
    return folder


def main():
    print(f"python {sys.version.split()[0]}, paddle {paddle.__version__}, paddlex {paddlex.__version__}, "
          f"paddleocr {paddleocr.__version__}, emanet {emanet.__version__}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = paddlex_segmentation_folder(work)
        image = np.random.RandomState(0).randint(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8)
        expected = load_exported(str(folder)).predict(image)  # both read an array as BGR, as cv2 does
        emanet_paddlex.register()
        result = next(iter(paddlex.create_model('EMANet-R18', model_dir=str(folder)).predict(image)))
        labels = np.asarray(result['pred'])[0]
        assert labels.shape == (HEIGHT, WIDTH), labels.shape
        agreement = float((labels == expected).mean())
        assert len(np.unique(expected)) >= 2 and agreement == 1.0, (np.unique(expected), agreement)
        print(f"PaddleX create_model('EMANet-R18') ran the exported EMANet: labels equal emanet's on "
              f"{HEIGHT}x{WIDTH} ({len(np.unique(labels))} classes present)")

        page = np.zeros((320, 480, 3), np.uint8)
        page[100:160, 120:360] = 255  # one white box: y 100-160, x 120-360
        detector = paddleocr.TextDetection(model_name='PP-OCRv5_mobile_det',
                                           model_dir=str(paddleocr_detection_folder(work)))
        polygons = np.asarray(next(iter(detector.predict(page)))['dt_polys'])
        assert len(polygons) == 1, polygons
        (x0, y0), (x1, y1) = polygons[0].min(axis=0), polygons[0].max(axis=0)
        # DB post-processing grows a box by area * unclip_ratio / perimeter (36 px here)
        assert 120 - 50 < x0 <= 120 and 360 <= x1 < 360 + 50 and 100 - 50 < y0 <= 100 and 160 <= y1 < 160 + 50, \
            polygons
        print(f"PaddleOCR TextDetection found the box: x {x0}-{x1}, y {y0}-{y1}")
    print("PaddleX and PaddleOCR import and predict beside emanet")


if __name__ == '__main__':
    main()
