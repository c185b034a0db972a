"""EMANet in PaddleX 3: the model folder PaddleX reads, and the one call that makes PaddleX know EMANet.

PaddleX 3.7 runs a semantic-segmentation model from a folder holding ``inference.json`` +
``inference.pdiparams`` and an ``inference.yml`` naming the model (``Global.model_name``) and its
preprocessing (``Deploy.transforms``: PaddleX knows ``Normalize`` and ``Resize`` only), once the name
is bound to its segmentation predictor. It has no plugin mechanism, so the binding is made in the
process that uses it: ``register()`` before ``paddlex.create_model``/``create_pipeline``, or
``tools/paddlex_pipeline.py``, which registers and then runs PaddleX's own pipeline or serving app.

    from emanet.integrations import paddlex as emanet_paddlex
    emanet_paddlex.register()
    model = paddlex.create_model(model_name='EMANet-R101', model_dir='output/paddlex')

Our names are our own (``EMANet-R50``, ``EMANet-R101``, ...): a folder never claims to be another
model. The folder also holds this package's ``deploy.yaml``, so ``tools/infer.py`` runs it as it is.
Nothing here imports PaddleX until PaddleX is asked for.
"""
import importlib.metadata
import os
import re

import yaml

from emanet.errors import InvalidInput, Unsupported
from emanet.untrusted import load_mapping

# Versions of PaddleX this integration was tested with (tests/integrations/test_paddlex.py).
SUPPORTED_PADDLEX = ('3.7.2',)
INSTALL_HINT = "pip install 'emanet-paddle[paddlex]' (PaddleX 3.7.2 with its cv and serving extras)"
MODEL_FILE_PREFIX = 'inference'  # PaddleX's file names: inference.json, inference.pdiparams, inference.yml
CONFIG_FILE = 'inference.yml'
NAME_PATTERN = re.compile(r'EMANet-[A-Za-z0-9][A-Za-z0-9_.-]*')
# The names register() binds without being told: one per backbone this package has configs for.
DEFAULT_NAMES = ('EMANet-R18', 'EMANet-R50', 'EMANet-R101')
# What PaddleX's segmentation predictor can apply before the model (its _FUNC_MAP).
PADDLEX_TRANSFORMS = ('Normalize', 'Resize')
# Left out of the folder's preprocessing: padding serves batching images of different sizes in
# evaluation; one image at a time needs none (the export's check is made without it).
DROPPED_TRANSFORMS = ('Padding',)
PIPELINE = 'semantic_segmentation'


def default_model_name(model_cfg):
    """``EMANet-R101`` for a ResNet101_vd backbone (the number of layers), else ``EMANet-<backbone type>``."""
    backbone = str((model_cfg.get('backbone') or {}).get('type', 'backbone'))
    layers = re.match(r'ResNet(\d+)', backbone)
    return f"EMANet-R{layers.group(1)}" if layers else f"EMANet-{backbone}"


def check_model_name(name):
    """Refuse a name that is not ours ('EMANet-...'): a folder must not pass for another PaddleX model."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"PaddleX model name {name!r}: it must start with 'EMANet-' and hold only letters, "
                           f"digits, '_', '.', '-' (a name of another model would make its metadata lie)")
    return name


def paddlex_transforms(transforms_cfg):
    """The config's val transforms as PaddleX's ``Deploy.transforms``; returns (transforms, names left out).

    Padding is left out (see DROPPED_TRANSFORMS); anything else PaddleX cannot apply is refused in one
    sentence rather than silently changing what the model sees.
    """
    kept, dropped = [], []
    for transform in transforms_cfg:
        kind = transform.get('type')
        if kind in DROPPED_TRANSFORMS:
            dropped.append(kind)
        elif kind in PADDLEX_TRANSFORMS:
            kept.append(dict(transform))
        else:
            raise InvalidInput(f"val_dataset transform {kind!r}: PaddleX's segmentation predictor applies only "
                               f"{' and '.join(PADDLEX_TRANSFORMS)}, so a PaddleX folder cannot preprocess as "
                               f"this config does")
    for transform in kept:  # PaddleX's Normalize defaults equal PaddleSeg's; written out so the file says them
        if transform['type'] == 'Normalize':
            transform.setdefault('mean', [0.5, 0.5, 0.5])
            transform.setdefault('std', [0.5, 0.5, 0.5])
    if not any(transform['type'] == 'Normalize' for transform in kept):
        raise InvalidInput("val_dataset transforms have no Normalize: PaddleX's segmentation predictor needs one")
    return kept, dropped


def write_model_folder(folder, model_name):
    """Turn this package's Paddle export in ``folder`` into the folder PaddleX reads, in place.

    The model files are renamed to PaddleX's names, ``deploy.yaml`` follows them, and ``inference.yml``
    names the model. The export must label (argmax): PaddleX's predictor takes labels [N, H, W].
    """
    from emanet.deploy.static_graph import read_deploy_config, rewrite_deploy_config
    check_model_name(model_name)
    deploy = read_deploy_config(folder)
    if deploy['output_op'] != 'argmax':
        raise InvalidInput(f"PaddleX's segmentation predictor takes labels: export with --output_op argmax, "
                           f"not {deploy['output_op']}")
    files = {}
    for key in ('model', 'params'):
        suffix = os.path.basename(deploy[key]).split('.', 1)[1]  # json / pdmodel, pdiparams
        files[key] = f'{MODEL_FILE_PREFIX}.{suffix}'
        os.replace(deploy[key], os.path.join(folder, files[key]))
    for leftover in os.listdir(folder):  # e.g. model.pdiparams.info, which nothing reads
        if leftover.startswith('model.'):
            os.remove(os.path.join(folder, leftover))
    rewrite_deploy_config(folder, deploy, paddlex_model_name=model_name, **files)  # still a Paddle model
    with open(os.path.join(folder, CONFIG_FILE), 'w') as f:
        yaml.safe_dump({'Global': {'model_name': model_name},
                        'Deploy': {'model': files['model'], 'params': files['params'],
                                   'transforms': deploy['transforms']}}, f, sort_keys=False)
    return os.path.join(folder, CONFIG_FILE)


def model_name_of(model_dir):
    """The model name a PaddleX folder gives in its inference.yml (checked to be one of ours)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a PaddleX model folder (tools/export.py --format paddlex "
                                f"writes one)")
    config = load_mapping(path, 'a PaddleX model config')
    name = (config.get('Global') or {}).get('model_name') if isinstance(config.get('Global'), dict) else None
    if name is None:
        raise InvalidInput(f"{path}: no Global.model_name")
    return check_model_name(name)


def import_paddlex():
    """PaddleX, when a supported version is installed; else one sentence saying what to install."""
    try:
        version = importlib.metadata.version('paddlex')
    except importlib.metadata.PackageNotFoundError:
        raise Unsupported(f"PaddleX is not installed: {INSTALL_HINT}") from None
    if version not in SUPPORTED_PADDLEX:
        raise Unsupported(f"PaddleX {version} is installed; EMANet's PaddleX integration is tested with PaddleX "
                          f"{', '.join(SUPPORTED_PADDLEX)} only: {INSTALL_HINT}")
    import paddlex
    return paddlex


def register(*names):
    """Bind EMANet model names to PaddleX's semantic-segmentation predictor, in this process.

    With no names, the default family (``DEFAULT_NAMES``); give the name of a folder exported with
    ``--paddlex_name`` (``model_name_of(folder)``). The names run on PaddleX's Paddle Inference engine and
    its ONNX Runtime engine (a folder holding inference.onnx). Calling it again does nothing more.
    Returns the names bound.
    """
    import_paddlex()
    from paddlex.inference.models.bindings import register_predictor_binding_map, try_get_binding
    from paddlex.inference.models.semantic_segmentation.predictor import SegRunnerPredictor
    names = tuple(check_model_name(name) for name in (names or DEFAULT_NAMES))
    for name in names:
        binding = try_get_binding(name, 'paddle_static')
        if binding is not None and binding.predictor is not SegRunnerPredictor:
            raise InvalidInput(f"PaddleX already binds {name!r} to {binding.predictor.__name__}; not replacing it")
    register_predictor_binding_map(SegRunnerPredictor, {'paddle_static': list(names), 'onnxruntime': list(names)})
    return names


def pipeline_config(model_dir, batch_size=1):
    """A PaddleX semantic-segmentation pipeline config that runs the EMANet folder ``model_dir``."""
    return {'pipeline_name': PIPELINE,
            'SubModules': {'SemanticSegmentation': {
                'module_name': PIPELINE, 'model_name': model_name_of(model_dir),
                'model_dir': os.path.abspath(model_dir), 'batch_size': batch_size, 'target_size': None}}}


def _model_dir_of(config):
    """The model folder a pipeline config names (for registering its model name)."""
    try:
        return config['SubModules']['SemanticSegmentation']['model_dir']
    except (KeyError, TypeError):
        raise InvalidInput(f"not a PaddleX {PIPELINE} pipeline config: no SubModules.SemanticSegmentation."
                           f"model_dir") from None


def create_pipeline(model_dir=None, config=None, **options):
    """PaddleX's semantic-segmentation pipeline running an EMANet folder (``model_dir``) or the pipeline
    ``config`` (a dict or YAML path naming one); ``options`` go to ``paddlex.create_pipeline`` (device,
    engine, ...)."""
    paddlex = import_paddlex()
    config = load_pipeline_config(config) if config is not None else pipeline_config(model_dir)
    register(model_name_of(_model_dir_of(config)))
    return paddlex.create_pipeline(config=config, **options), config


def load_pipeline_config(config):
    """A pipeline config given as a dict or as the path of a YAML file."""
    if isinstance(config, dict):
        return config
    if not os.path.isfile(config):
        raise FileNotFoundError(f"pipeline config not found: {config}")
    return load_mapping(config, 'a PaddleX pipeline config')


def serving_app(pipeline, config):
    """PaddleX's own FastAPI app for the semantic-segmentation pipeline (POST /semantic-segmentation)."""
    try:  # PaddleX raises RuntimeError when its serving extras (fastapi, uvicorn, ...) are missing
        from paddlex.inference.serving.basic_serving import create_pipeline_app
        return create_pipeline_app(pipeline, config)
    except RuntimeError as error:
        raise Unsupported(f"PaddleX's serving cannot start ({error}): {INSTALL_HINT}") from None


def serve(model_dir=None, config=None, host='127.0.0.1', port=8080, **options):
    """Serve an EMANet folder with PaddleX's serving app until interrupted."""
    pipeline, config = create_pipeline(model_dir, config, **options)
    app = serving_app(pipeline, config)
    from paddlex.inference.serving.basic_serving import run_server
    run_server(app, host=host, port=port)
