"""The one config loader: PaddleSeg's YAML format (``_base_``, ``--opts``), checked up front.

Mistakes in a config end in one ``ConfigError`` that names the file and the key,
with the closest known name, before any training time is spent. Training needs the whole
config; export, evaluation and prediction need only ``model`` and ``val_dataset``.
"""
import contextlib
import difflib
import inspect
import os
import re
import tempfile

import yaml
from paddleseg.cvlibs import Config, SegBuilder, config_checker, manager
from paddleseg.utils import logger as paddleseg_logger
from paddleseg.utils.utils import CachedProperty as cached_property

from emanet.checkpoint import load_weights


TOP_LEVEL_KEYS = ('batch_size', 'iters', 'train_dataset', 'val_dataset', 'optimizer', 'lr_scheduler',
                  'loss', 'model', 'test_config', 'export', 'distill_loss', 'to_static_training',
                  '_base_', '_inherited_')
TRAINING_KEYS = ('batch_size', 'iters', 'train_dataset', 'optimizer', 'lr_scheduler', 'loss', 'model')
INFERENCE_KEYS = ('model', 'val_dataset')


class ConfigError(ValueError):
    """A config file is missing, malformed, or names a key or type that does not exist."""


def closest(name, choices):
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ''


@contextlib.contextmanager
def paddleseg_errors_only():
    """PaddleSeg's own (print-based) logger shows errors only, inside the block.

    Its warnings while checking a config and building a model or loss say which num_classes,
    in_channels or ignore_index it copied from the dataset, and its backbones say "trained from
    scratch" also when whole-model weights are loaded next: nothing a user acts on.
    """
    previous = paddleseg_logger.log_level
    paddleseg_logger.log_level = 0  # 0 = ERROR
    try:
        yield
    finally:
        paddleseg_logger.log_level = previous


class _Checks:
    """The checker handed to PaddleSeg's Config: a misspelt or missing key is named before
    PaddleSeg's rules run, and their errors come through as they are (load_config adds the file).

    Training runs all of PaddleSeg's rules. Without training, the rules that copy num_classes and
    in_channels from the datasets into the model run when there is a train_dataset to copy from;
    otherwise ``Builder.model`` takes num_classes from the val set.
    """

    def __init__(self, training):
        self.training = training

    def apply_all_rules(self, cfg):
        unknown = [key for key in cfg.dic if key not in TOP_LEVEL_KEYS]
        if unknown:
            raise ConfigError(f"unknown key '{unknown[0]}'{closest(unknown[0], TOP_LEVEL_KEYS)}")
        required = TRAINING_KEYS if self.training else INFERENCE_KEYS
        missing = [key for key in required if key not in cfg.dic]
        if missing:
            needs = 'training needs' if self.training else 'export, evaluation and prediction need'
            raise ConfigError(f"missing key '{missing[0]}' ({needs} {', '.join(required)})")
        if self.training:
            rules = Config._build_default_checker().rule_list
        elif 'train_dataset' in cfg.dic:
            rules = [config_checker.DefaultSyncNumClassesRule(), config_checker.DefaultSyncImgChannelsRule()]
        else:
            rules = []
        for rule in rules:
            rule.apply(cfg, allow_update=True)


def load_config(path, learning_rate=None, batch_size=None, iters=None, opts=None, training=True):
    """Read a PaddleSeg-style YAML config, with command-line overrides, into a ``paddleseg`` Config.

    ``training`` False (export, evaluation, prediction) asks only for ``model`` and ``val_dataset``.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with paddleseg_errors_only():
            cfg = Config(path, learning_rate=learning_rate, batch_size=batch_size, iters=iters, opts=opts,
                         checker=_Checks(training))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    except (AssertionError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: {str(err).strip()}") from None
    cfg.path = path
    return cfg


def save_config(cfg, path):
    """Write the config as loaded (bases merged, overrides applied) to ``path``.

    Written to a temporary file and renamed, so data-parallel processes may all write it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=folder, suffix='.part', delete=False) as f:
        f.write(str(cfg))
    os.replace(f.name, path)


def _argument_names(component):
    """Keyword arguments ``component`` accepts, or None when it takes any (**kwargs) or can't be read."""
    try:
        parameters = inspect.signature(component).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


class Builder(SegBuilder):
    """PaddleSeg's builder, with errors that name the config key and the closest known name.

    A config without ``train_dataset`` (see ``load_config``) builds its model from ``model``
    and the val set. The config is not logged piece by piece; ``save_config`` writes it whole.
    """

    def __init__(self, config):
        super().__init__(config)
        self.path = getattr(config, 'path', 'config')

    @classmethod
    def show_msg(cls, name, cfg):
        """PaddleSeg logs each section as it builds it; the tools save or log the config whole."""

    @cached_property
    def model(self):
        with paddleseg_errors_only():
            if self.config.train_dataset_cfg:
                return super().model
            # Not for training: the val set says how many classes the model has, if the model does not.
            model_cfg = self.config.model_cfg
            if 'num_classes' not in model_cfg:
                num_classes = self.config.val_dataset_cfg.get(
                    'num_classes', getattr(self.val_dataset_class, 'NUM_CLASSES', None))
                if num_classes is None:
                    raise ConfigError(f"{self.path}: neither model nor val_dataset gives num_classes")
                model_cfg['num_classes'] = num_classes
            return self.build_component(model_cfg)

    @cached_property
    def loss(self):
        with paddleseg_errors_only():
            return super().loss

    def load_component_class(self, class_type):
        for registry in self.comp_list:
            if class_type in registry.components_dict:
                return registry[class_type]
        known = [name for registry in self.comp_list for name in registry.components_dict]
        raise ConfigError(f"{self.path}: unknown type '{class_type}'{closest(class_type, known)}")

    def build_component_impl(self, component_class, *args, **kwargs):
        name = component_class.__name__
        known = _argument_names(component_class)
        for key in kwargs:
            if known is not None and key not in known:
                raise ConfigError(f"{self.path}: {name} has no argument '{key}'{closest(key, known)}")
        try:
            return component_class(*args, **kwargs)
        except TypeError as err:
            # Factories such as ResNet18_vd(**args) pass their arguments on to a class.
            match = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
            if not match:
                raise
            target = getattr(inspect.getmodule(component_class), match.group(1), None)
            known = _argument_names(target) or ()
            raise ConfigError(f"{self.path}: {name} has no argument '{match.group(2)}'"
                              f"{closest(match.group(2), known)}") from None

    def build_component(self, cfg):
        """Build as PaddleSeg does, but load a backbone's ``pretrained`` weights ourselves.

        PaddleSeg's loader unpickles with ``paddle.load`` (which can run code) and gives
        a raw traceback when a download fails; ours does neither.
        """
        pretrained = cfg.get('pretrained')
        is_backbone = cfg.get('type') in manager.BACKBONES.components_dict
        if is_backbone and pretrained:
            backbone = self.build_component({**cfg, 'pretrained': None})
            return load_weights(backbone, pretrained, strict=False)
        try:
            return super().build_component(cfg)
        except RuntimeError as err:
            # PaddleSeg wraps every error of a component in "Tried to create a X object ...";
            # raise the original one, which names the file or value at fault.
            original = err
            while original.__context__ is not None and str(original).startswith('Tried to create'):
                original = original.__context__
            if original is err:
                raise
            raise original from None


def build_model(cfg, weights=None):
    """Build the config's model; with ``weights`` (a path or URL) load them strictly.

    Given whole-model weights, the backbone's ImageNet weights are not downloaded.
    """
    if weights is not None:
        model_cfg = cfg.dic['model']
        model_cfg.pop('pretrained', None)
        if isinstance(model_cfg.get('backbone'), dict):
            model_cfg['backbone'].pop('pretrained', None)
    model = Builder(cfg).model
    if weights is not None:
        load_weights(model, weights)
    return model
