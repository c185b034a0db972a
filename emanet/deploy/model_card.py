"""The model card of an exported folder: a README.md beside the model saying what it is, which classes it
labels in which colours, how images must be prepared, how closely it agrees with the dygraph model it was
exported from, and the two lines that run it. ``export_checked`` writes it into the staging folder, so the
card and the model it describes are published together or not at all.
"""
import dataclasses
import datetime
import os
import shlex

from emanet.deploy.backends import DEFAULT_BACKEND
from emanet.deploy.static_graph import read_deploy_config, rewrite_deploy_config
from emanet.engine.attention import find_em_unit
from emanet.engine.predict import color_map

CARD_FILE = 'README.md'
RUNTIMES = {'paddle': ('Paddle Inference', 'CPU and GPU'), 'onnxruntime': ('ONNX Runtime', 'CPU'),
            'openvino': ('OpenVINO', 'CPU')}
OUTPUTS = {'none': 'logits [N, {classes}, H, W] float32: flips, scales and sliding windows can average them',
           'softmax': 'probabilities [N, {classes}, H, W] float32',
           'argmax': 'labels [N, H, W] int32 (no flips, scales or sliding windows)'}
# Where the command lines of the card read an image from: the reader puts their own.
IMAGE_PLACEHOLDER = 'path/to/image.png'


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a model card says of a model beyond its export.

    Attributes:
        architecture: 'EMANet'.
        backbone: 'ResNet18_vd'.
        output_stride: the backbone's, or None where the config does not say.
        em_unit: '16 bases, 3 EM iterations'.
        class_names: one name per class, or None ('class 0', 'class 1', ...).
        palette: an RGB colour per class, or None (PaddleSeg's colours, as the tools draw them).
        weights: the weights it was exported from, or None.
        config: the config they were trained with, or None.
    """
    architecture: str
    backbone: str
    output_stride: int
    em_unit: str
    class_names: tuple = None
    palette: tuple = None
    weights: str = None
    config: str = None


def describe_model(model, model_cfg=None, dataset_class=None, weights=None, config=None):
    """The ``ModelDescription`` of ``model``, with the config's ``model`` section (for what the built model does not
    keep, such as the backbone's name and output stride) and the val set's class (its CLASS_NAMES and PALETTE, if
    any)."""
    unit = find_em_unit(model)
    backbone_cfg = (model_cfg or {}).get('backbone') or {}
    # The config's name: PaddleSeg's ResNet18_vd is a function building a ResNet_vd.
    return ModelDescription(architecture=type(model).__name__,
                            backbone=str(backbone_cfg.get('type') or type(model.backbone).__name__),
                            output_stride=backbone_cfg.get('output_stride'),
                            em_unit=f'{unit.mu.shape[-1]} bases, {unit.stage_num} EM iterations',
                            class_names=getattr(dataset_class, 'CLASS_NAMES', None),
                            palette=getattr(dataset_class, 'PALETTE', None), weights=weights, config=config)


def classes(description, num_classes):
    """[(name, (r, g, b))] of each of ``num_classes`` classes: the description's names and colours where it has
    one per class, else 'class i' and PaddleSeg's colours (what tools/predict.py and tools/infer.py draw)."""
    names = description.class_names
    if names is None or len(names) != num_classes:
        names = [f'class {index}' for index in range(num_classes)]
    palette = description.palette if description.palette and len(description.palette) == num_classes else None
    flat = color_map(palette)
    return [(str(name), tuple(int(v) for v in flat[3 * index:3 * index + 3])) for index, name in enumerate(names)]


def store_classes(folder, description):
    """Write the class names and colours into folder/deploy.yaml, where tools/infer.py and the demo read them."""
    deploy = read_deploy_config(folder)
    named = classes(description, deploy['num_classes'])
    files = {key: os.path.basename(deploy[key]) for key in ('model', 'params') if deploy.get(key)}
    rewrite_deploy_config(folder, deploy, class_names=[name for name, _ in named],
                          palette=[list(color) for _, color in named], **files)


def write_model_card(folder, shown_path, description, agreement, check_images, min_agreement, miou=None):
    """Write folder/README.md, the card of the export in ``folder``; ``shown_path`` is the folder's path in its
    command lines (where it is published). ``agreement``: the share of labels equal to the dygraph model's on
    ``check_images`` images (at least ``min_agreement``); ``miou``: {'fp32': .., 'int8': ..} or None."""
    deploy = read_deploy_config(folder)
    export_format = 'paddlex' if deploy.get('paddlex_model_name') else deploy['format']
    precision = deploy.get('quantization', 'fp32')
    runtime_name, devices = RUNTIMES[DEFAULT_BACKEND[deploy['format']]]
    runtime = f'{runtime_name} ({devices})'
    if deploy['format'] == 'onnx':
        runtime += '; OpenVINO reads it too (`--backend openvino`)'
    if export_format == 'paddlex':
        runtime += f"; PaddleX 3 as model `{deploy['paddlex_model_name']}` (see inference.yml)"
    num_classes = deploy['num_classes']
    files = ', '.join(sorted(name for name in os.listdir(folder) if name != CARD_FILE))
    shape = deploy['input_shape']
    fixed = [str(size) if size not in (None, -1) else name for size, name in zip(shape, ('N', '3', 'H', 'W'))]
    free = [name for size, name in zip(shape, 'NCHW') if size in (None, -1)]
    input_text = f"float32 [{', '.join(fixed)}], RGB" + (f"; any {', '.join(free)}" if free else '')
    lines = [
        f'# {description.architecture} ({description.backbone}) for {runtime_name}',
        '',
        f'Written by `tools/export.py` (emanet-paddle) on {datetime.date.today().isoformat()}'
        + (f', from `{description.weights}`' if description.weights else '')
        + (f' with `{description.config}`' if description.config else '') + '.',
        '',
        '| | |',
        '|---|---|',
        f'| Model | {description.architecture}: {description.backbone} backbone'
        + (f' (output stride {description.output_stride})' if description.output_stride else '')
        + f'; EM attention unit of '
        f'{description.em_unit} |',
        f'| Format | {export_format} ({files}) |',
        f'| Precision | {precision} |',
        f'| Runtime | {runtime} |',
        f'| Input | {input_text} |',
        f'| Output | {OUTPUTS[deploy["output_op"]].format(classes=num_classes)} |',
        f'| Agreement with the dygraph model | {agreement:.4%} of the pixel labels equal on {check_images} '
        f'image{"s" if check_images != 1 else ""} (at least {min_agreement:.2%} required) |',
        '| mIoU | ' + (f"{miou['int8']:.4f} int8, {miou['fp32']:.4f} fp32 (measured by the export on the val set)"
                       if miou else 'not measured by the export: `python tools/val.py --config '
                                    f'{description.config or "CONFIG"} --model_path {shown_path}`') + ' |',
        '',
        '## Run it',
        '',
        '```bash',
        f'python tools/infer.py --config {shlex.quote(str(shown_path))} --image_path {IMAGE_PLACEHOLDER} '
        '--save_dir output/result',
        '```',
        '',
        '```python',
        'from emanet.deploy.backends import load_exported',
        f'labels = load_exported({str(shown_path)!r}).predict({IMAGE_PLACEHOLDER!r})  # [H, W] class indices',
        '```',
        '',
        '## Preprocessing',
        '',
        'Each image is read as 8-bit RGB (OpenCV reads BGR; the transforms turn it to RGB), then:',
        '',
        *[f'- {_transform_text(transform)}' for transform in deploy['transforms']],
        '',
        'then laid out channels first. Labels come back at the image\'s own size.',
        '',
        '## Classes',
        '',
        '| id | name | colour (RGB) |',
        '|---|---|---|',
        *[f'| {index} | {name} | #{r:02x}{g:02x}{b:02x} ({r}, {g}, {b}) |'
          for index, (name, (r, g, b)) in enumerate(classes(description, num_classes))],
        '',
    ]
    with open(os.path.join(folder, CARD_FILE), 'w') as f:
        f.write('\n'.join(lines))


def _transform_text(transform):
    if transform['type'] == 'Normalize':
        mean, std = transform.get('mean', [0.5] * 3), transform.get('std', [0.5] * 3)
        return f'Normalize: (pixel / 255 - mean) / std, mean {mean}, std {std}'
    arguments = ', '.join(f'{key} {value}' for key, value in transform.items() if key != 'type')
    return f"{transform['type']}" + (f': {arguments}' if arguments else '')
