"""A demo page (Gradio) of a model: an uploaded image, or one of the drawn street scenes, comes back
segmented, with a legend of its classes, what the EM unit attends to and how long it took.

``build_demo`` makes the page for a ``DemoModel`` (``model_from_weights`` or ``model_from_export``);
``launch`` serves it, on 127.0.0.1 unless told otherwise. Uploads are untrusted bytes: bounded in bytes
and in the pixels their header declares, and checked complete, by the checks every training and
evaluation sample passes (``emanet.data.loading.check_files``); a file that fails comes back as one
sentence on the page. Gradio is optional (``pip install 'emanet-paddle[demo]'``) and imported here only
when a page is built.
"""
import collections
import dataclasses
import html
import os
import shutil
import tempfile
import threading
import time

import cv2
import numpy as np
import paddle

from emanet.config import Builder, build_model
from emanet.data.loading import MAX_PIXELS_VARIABLE, check_files
from emanet.data.scene_painter import draw_street_scene
from emanet.deploy.backends import load_exported
from emanet.deploy.model_card import RUNTIMES
from emanet.engine.attention import attention_picture, bgr_class_colors, em_attention
from emanet.engine.inference import ModelSegmenter
from emanet.engine.predict import IMAGE_SUFFIXES, color_map, pseudo_color_image
from emanet.errors import InvalidInput, Unsupported, UserError
from emanet.logger import logger
from emanet.test_time import InferenceOptions
from emanet.tiles import overlay

DEMO_EXTRA = "pip install 'emanet-paddle[demo]'"
MAX_UPLOAD_BYTES = 20 * 2 ** 20
MAX_UPLOAD_PIXELS = 4096 * 4096
# The sliding window when neither the command line nor the config gives one: (width, height) and stride.
DEFAULT_WINDOW = ((512, 512), (341, 341))
ATTENTION_BASES = 6  # responsibility maps shown: those of the bases that hold most pixels
KEPT_RESULTS = 16  # label files kept for download; older ones are removed
NO_ATTENTION = ("Attention maps are not available for an exported model: the exported graph does not give the "
                "EM unit's responsibilities; run the demo with the weights (`--model_path model.pdparams "
                "--config CONFIG`) to see them.")


def require_gradio():
    """The gradio module, or one sentence naming the extra that installs it."""
    try:
        import gradio
    except ImportError:
        raise Unsupported(f"the demo page needs Gradio 6 (Python 3.10 or later): {DEMO_EXTRA}") from None
    return gradio


@dataclasses.dataclass
class DemoModel:
    """What the page runs.

    Attributes:
        segmenter_for: ``InferenceOptions`` -> a Segmenter that runs them.
        class_names: one name per class.
        palette: an RGB colour per class, as the tools draw them.
        runtime: what runs the model, in words ('Paddle 3.3.1 dygraph').
        attention: the plain dygraph ModelSegmenter whose EM unit is shown, or None for an export.
        window: the sliding window's ((width, height), (stride width, stride height)).
    """
    segmenter_for: callable
    class_names: list
    palette: list
    runtime: str
    attention: ModelSegmenter = None
    window: tuple = DEFAULT_WINDOW


def _classes(names, palette, num_classes):
    names = list(names) if names is not None and len(names) == num_classes else [
        f'class {index}' for index in range(num_classes)]
    flat = color_map(palette if palette is not None and len(palette) == num_classes else None)
    return names, [tuple(flat[3 * index:3 * index + 3]) for index in range(num_classes)]


def model_from_weights(model, transforms_cfg, num_classes, class_names=None, palette=None, window=None):
    """A ``DemoModel`` of a dygraph ``model`` (with its val transforms); the dataset's names and ``palette``
    where it has them, else 'class i' and PaddleSeg's colours."""
    names, colors = _classes(class_names, palette, num_classes)
    return DemoModel(segmenter_for=lambda options: ModelSegmenter(model, transforms_cfg, options),
                     class_names=names, palette=colors, runtime=f'Paddle {paddle.__version__} dygraph',
                     attention=ModelSegmenter(model, transforms_cfg), window=window or DEFAULT_WINDOW)


def model_from_config(cfg, weights, window=None):
    """A ``DemoModel`` of the config's model with ``weights`` (a path or URL), prepared by its val transforms;
    its classes named and coloured as the val set's."""
    builder = Builder(cfg)
    model = build_model(cfg, weights=weights)
    dataset_class = builder.val_dataset_class
    num_classes = cfg.model_cfg.get('num_classes') or cfg.val_dataset_cfg.get('num_classes') or getattr(
        dataset_class, 'NUM_CLASSES', None)
    return model_from_weights(model, cfg.val_dataset_cfg.get('transforms') or [], num_classes,
                              getattr(dataset_class, 'CLASS_NAMES', None), getattr(dataset_class, 'PALETTE', None),
                              window=window)


def model_from_export(folder, backend=None, window=None):
    """A ``DemoModel`` of the exported ``folder`` in ``backend`` (by default its format's runtime); its classes
    from its deploy.yaml. One segmenter is loaded per set of options asked for, then kept."""
    plain = load_exported(folder, backend=backend)
    loaded = {InferenceOptions(): plain}
    lock = threading.Lock()

    def segmenter_for(options):
        with lock:
            if options not in loaded:
                loaded[options] = load_exported(folder, backend=backend, options=options)
            return loaded[options]

    # A deploy.yaml written elsewhere (PaddleSeg's) may not say how many classes: every label value is named.
    names, colors = _classes(plain.deploy.get('class_names'), plain.deploy.get('palette'),
                             plain.deploy.get('num_classes') or 256)
    return DemoModel(segmenter_for=segmenter_for, class_names=names, palette=colors,
                     runtime=f"{RUNTIMES[plain.backend][0]} ({plain.deploy['format']} export)",
                     window=window or DEFAULT_WINDOW)


@dataclasses.dataclass
class DemoResult:
    """What the page shows for one image: RGB pictures, the legend (HTML), the label PNG, one line of text."""
    overlay: np.ndarray = None
    legend: str = ''
    attention: np.ndarray = None
    label_file: str = None
    status: str = ''


class Demo:
    """The page's work, apart from Gradio: checks an upload, segments it, draws what the page shows.

    Label PNGs for download go to a folder of its own (``results_dir``), of which it keeps the newest
    ``KEPT_RESULTS``.
    """

    def __init__(self, model, max_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_UPLOAD_PIXELS):
        self.model = model
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.results_dir = tempfile.mkdtemp(prefix='emanet_demo_')
        self.results = collections.deque()
        self.lock = threading.Lock()  # one image at a time through the model

    def close(self):
        """Remove the label files it wrote."""
        shutil.rmtree(self.results_dir, ignore_errors=True)

    def options(self, flip, sliding_window):
        crop_size, stride = self.model.window
        return InferenceOptions(aug_eval=flip, flip_horizontal=flip, is_slide=sliding_window,
                                crop_size=crop_size if sliding_window else None,
                                stride=stride if sliding_window else None)

    def read_upload(self, path):
        """The BGR image of an uploaded file, after the checks every sample passes; errors name the file."""
        name = os.path.basename(path)
        size = os.path.getsize(path)
        if size > self.max_bytes:
            raise InvalidInput(f"{name}: {size / 2 ** 20:.1f} MB, more than the {self.max_bytes / 2 ** 20:.0f} MB "
                               "this page accepts")
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise InvalidInput(f"{name}: not an image file this page reads ({', '.join(IMAGE_SUFFIXES)})")
        try:
            check_files(path, None, self.max_pixels)
        except UserError as err:
            # The same sentence as for a training sample, naming the upload and this page's limit.
            message = str(err).replace(path, name).replace(MAX_PIXELS_VARIABLE, '--max_upload_pixels')
            raise InvalidInput(message) from None
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise InvalidInput(f"{name}: OpenCV cannot decode this image")
        return image

    def run(self, path, flip=False, sliding_window=False, show_attention=True):
        """The ``DemoResult`` of the image file ``path``; a file or option that cannot be used is its one sentence
        in ``status``, and so is an unexpected failure (whose traceback goes to the log)."""
        if not path:
            return DemoResult(status='Upload an image or pick an example.')
        try:
            return self._run(path, flip, sliding_window, show_attention)
        except UserError as err:
            return DemoResult(status=str(err))
        except Exception as err:  # a bug: the page says what failed in one sentence, the log keeps the traceback
            logger.exception("the demo failed on %s", path)
            return DemoResult(status=f"Segmenting {os.path.basename(path)} failed ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:200]}); the server's log has the details.")

    def _run(self, path, flip, sliding_window, show_attention):
        image = self.read_upload(path)
        options = self.options(flip, sliding_window)
        with self.lock:
            segmenter = self.model.segmenter_for(options)
            start = time.perf_counter()
            label = segmenter.predict(image).astype(np.uint8)
            seconds = time.perf_counter() - start
            attention, attention_seconds = None, None
            if show_attention and self.model.attention is not None:
                start = time.perf_counter()
                picture = attention_picture(image, em_attention(self.model.attention, image),
                                            bgr_class_colors(self.model.palette), top=ATTENTION_BASES)
                attention = picture[:, :, ::-1]
                attention_seconds = time.perf_counter() - start
        colors = color_map(self.model.palette)
        shown = overlay(image.copy(), label, colors, weight=0.6)[:, :, ::-1]
        ran = (['flip'] if flip else []) + (['sliding window %dx%d' % options.crop_size] if sliding_window else [])
        status = (f"{self.model.runtime}{' with ' + ' and '.join(ran) if ran else ''}: {seconds:.2f} s for "
                  f"{image.shape[1]}x{image.shape[0]} pixels"
                  + (f"; attention maps {attention_seconds:.2f} s" if attention_seconds is not None else '') + '.')
        return DemoResult(overlay=shown, legend=self.legend(label), attention=attention,
                          label_file=self.save_labels(label, colors, path), status=status)

    def legend(self, label):
        """HTML: a colour chip, name and share of pixels of each class in ``label``, most pixels first."""
        counts = np.bincount(label.reshape(-1), minlength=len(self.model.class_names))
        rows = []
        for index in np.argsort(-counts, kind='stable'):
            if counts[index] == 0:
                break
            r, g, b = self.model.palette[index] if index < len(self.model.palette) else (0, 0, 0)
            name = self.model.class_names[index] if index < len(self.model.class_names) else f'class {index}'
            rows.append(f'<li data-class="{index}"><span style="display:inline-block;width:1em;height:1em;'
                        f'background:rgb({r},{g},{b});vertical-align:middle;margin-right:.4em"></span>'
                        f'{html.escape(name)}: {_share(counts[index] / label.size)}</li>')
        return '<ul class="emanet-legend" style="list-style:none;padding:0">' + ''.join(rows) + '</ul>'

    def save_labels(self, label, colors, path):
        """``label`` as the palette PNG tools/predict.py writes, in a folder of its own; the newest kept."""
        folder = tempfile.mkdtemp(dir=self.results_dir)
        file = os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + '_labels.png')
        pseudo_color_image(label, colors).save(file)
        self.results.append(folder)
        while len(self.results) > KEPT_RESULTS:
            shutil.rmtree(self.results.popleft(), ignore_errors=True)
        return file


def _share(fraction):
    return f'{fraction:.1%}' if fraction >= 0.0005 else '<0.1%'


def example_images(folder, count=4, size=(512, 256), seed=2026):
    """``count`` drawn street scenes (the quick start's kind of image) written as PNGs into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index in range(count):
        rgb, _, _ = draw_street_scene(np.random.RandomState([seed, index]), size=size)
        paths.append(os.path.join(folder, f'street_scene_{index}.png'))
        cv2.imwrite(paths[-1], rgb[:, :, ::-1])
    return paths


def build_demo(demo, examples=()):
    """The Gradio page (``gradio.Blocks``) of ``demo`` (a ``Demo``), with ``examples`` (image paths) to pick."""
    gr = require_gradio()
    window = '%dx%d, stride %dx%d' % (*demo.model.window[0], *demo.model.window[1])
    with gr.Blocks(title='EMANet demo', analytics_enabled=False) as page:  # no calls home
        gr.Markdown(f"# EMANet: segmentation and EM attention\nRuns on {demo.model.runtime}. Images up to "
                    f"{demo.max_bytes / 2 ** 20:.0f} MB and {demo.max_pixels:,} pixels.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label='Image', file_types=list(IMAGE_SUFFIXES), type='filepath',
                                 elem_id='upload')
                flip = gr.Checkbox(label='Flip (average with the left-right flipped image)', value=False)
                slide = gr.Checkbox(label=f'Sliding window ({window})', value=False)
                show_attention = gr.Checkbox(label='Attention maps', value=demo.model.attention is not None,
                                             interactive=demo.model.attention is not None)
                run = gr.Button('Segment', variant='primary', elem_id='segment')
                if examples:
                    gr.Examples(examples=[[path] for path in examples], inputs=[upload], label='Drawn street scenes')
            with gr.Column():
                status = gr.Markdown(elem_id='status')
                shown = gr.Image(label='Segmentation over the image', format='png', type='numpy', height=320,
                                 interactive=False, elem_id='overlay')
                legend = gr.HTML(elem_id='legend')
                labels = gr.File(label='Labels (palette PNG, as tools/predict.py writes)', interactive=False,
                                 elem_id='labels')
        gr.Markdown('## What the EM unit attends to\nThe segmentation, each pixel\'s strongest base, then the '
                    f'responsibility maps of the {ATTENTION_BASES} bases that hold most pixels.'
                    if demo.model.attention is not None else '## What the EM unit attends to\n' + NO_ATTENTION)
        attention = gr.Image(label='EM attention', format='png', type='numpy', interactive=False,
                             elem_id='attention', visible=demo.model.attention is not None)

        def segment(path, flip_on, slide_on, attention_on):
            result = demo.run(path, flip_on, slide_on, attention_on)
            return result.status, result.overlay, result.legend, result.label_file, result.attention

        outputs = [status, shown, legend, labels, attention]
        inputs = [upload, flip, slide, show_attention]
        run.click(segment, inputs, outputs, concurrency_limit=1)
        upload.change(segment, inputs, outputs, concurrency_limit=1)
    return page


def launch(page, demo, host='127.0.0.1', port=None, examples_dir=None, block=True):
    """Serve ``page`` on ``host``:``port`` (by default 127.0.0.1 and Gradio's first free port from 7860), with
    uploads bounded by the demo's byte limit; returns Gradio's (app, local URL, share URL)."""
    gr = require_gradio()
    theme = gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],  # no web fonts to fetch
                              font_mono=['ui-monospace', 'monospace'])
    allowed = [demo.results_dir] + ([examples_dir] if examples_dir else [])
    return page.launch(server_name=host, server_port=port, max_file_size=demo.max_bytes, allowed_paths=allowed,
                       prevent_thread_lock=not block, quiet=True, theme=theme, footer_links=[],
                       share=False, show_error=False)
