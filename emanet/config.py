"""The one config loader: PaddleSeg's YAML format (``_base_``, ``--opts``), checked up front.

Mistakes in a config end in one ``ConfigError`` that names the file and the key,
with the closest known name, before any training time is spent. Training needs the whole
config; export, evaluation and prediction need only ``model`` and ``val_dataset``.

A config may come from someone else: it is read with YAML's safe loader (PaddleSeg's own
reader uses ``FullLoader``, which can build Python objects), its ``_base_`` chain is followed
with cycles and missing files named, and a config whose aliases would expand into a huge tree
(a "billion laughs" file) is refused before anything walks it.
"""
import contextlib
import difflib
import inspect
import os
import re
import tempfile

import paddle
from paddleseg.cvlibs import Config, SegBuilder, config_checker, manager
from paddleseg.cvlibs.config import merge_config_dicts
from paddleseg.utils import logger as paddleseg_logger
from paddleseg.utils.utils import CachedProperty as cached_property

from emanet import registry
from emanet.checkpoint import load_weights
from emanet.errors import UserError
from emanet.untrusted import UnreadableFile, load_yaml


TOP_LEVEL_KEYS = ('batch_size', 'iters', 'train_dataset', 'val_dataset', 'optimizer', 'lr_scheduler',
                  'loss', 'model', 'test_config', 'export', 'distill_loss', 'to_static_training',
                  '_base_', '_inherited_')
TRAINING_KEYS = ('batch_size', 'iters', 'train_dataset', 'optimizer', 'lr_scheduler', 'loss', 'model')
INFERENCE_KEYS = ('model', 'val_dataset')
# PaddleSeg's rules and builders read these sections as mappings and these counts as numbers.
MAPPING_KEYS = ('model', 'train_dataset', 'val_dataset', 'optimizer', 'lr_scheduler', 'loss', 'test_config', 'export')
COUNT_KEYS = ('batch_size', 'iters')
BASE_KEY = '_base_'
MAX_BASE_DEPTH = 32


class ConfigError(UserError, ValueError):
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
            raise ConfigError(f"{cfg.path}: unknown key '{unknown[0]}'{closest(unknown[0], TOP_LEVEL_KEYS)}")
        required = TRAINING_KEYS if self.training else INFERENCE_KEYS
        missing = [key for key in required if key not in cfg.dic]
        if missing:
            needs = 'training needs' if self.training else 'export, evaluation and prediction need'
            raise ConfigError(f"{cfg.path}: missing key '{missing[0]}' ({needs} {', '.join(required)})")
        wrong = [key for key in MAPPING_KEYS if key in cfg.dic and not isinstance(cfg.dic[key], dict)]
        wrong += [key for key in COUNT_KEYS if key in cfg.dic and not (type(cfg.dic[key]) is int and cfg.dic[key] > 0)]
        if wrong:
            kind = 'a mapping of keys' if wrong[0] in MAPPING_KEYS else 'a positive whole number'
            raise ConfigError(f"{cfg.path}: {wrong[0]} must be {kind}, got {cfg.dic[wrong[0]]!r:.60}")
        if self.training:
            rules = Config._build_default_checker().rule_list
        elif 'train_dataset' in cfg.dic:
            rules = [config_checker.DefaultSyncNumClassesRule(), config_checker.DefaultSyncImgChannelsRule()]
        else:
            rules = []
        for rule in rules:
            try:
                rule.apply(cfg, allow_update=True)
            except (AttributeError, TypeError, IndexError) as err:  # a value inside a section of another kind
                raise ConfigError(f"{cfg.path}: PaddleSeg's {type(rule).__name__} cannot read this config "
                                  f"(a value of the wrong kind: {err})") from None


def read_yaml_with_bases(path, inherited_by=()):
    """The dict of the YAML file ``path`` merged over its ``_base_`` files, as PaddleSeg merges them.

    ``inherited_by``: the files that named this one as their base, for the messages.
    """
    path = os.path.normpath(path)
    if not os.path.isfile(path):
        if inherited_by:
            raise ConfigError(f"{inherited_by[-1]}: its _base_ file {path} does not exist")
        raise ConfigError(f"config file not found: {path}")
    chain = [os.path.realpath(name) for name in inherited_by]
    if os.path.realpath(path) in chain:
        cycle = ' -> '.join([*inherited_by[chain.index(os.path.realpath(path)):], path])
        raise ConfigError(f"{path}: its _base_ files form a cycle ({cycle})")
    if len(inherited_by) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_BASE_DEPTH} levels of _base_ files")
    try:
        dic = load_yaml(path, 'a config')
    except UnreadableFile as err:
        raise ConfigError(str(err)) from None
    if dic is None:
        dic = {}
    if not isinstance(dic, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys (model, train_dataset, ...), "
                          f"this file holds a {type(dic).__name__}")
    bases = dic.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names")
    for base in bases:
        base_dic = read_yaml_with_bases(os.path.join(os.path.dirname(path), base), (*inherited_by, path))
        dic = merge_config_dicts(dic, base_dic)
    return dic


class _SafeConfig(Config):
    """PaddleSeg's Config, reading YAML with ``read_yaml_with_bases``; ``path`` names the file in errors."""

    def __init__(self, path, *args, **kwargs):
        self.path = path
        super().__init__(path, *args, **kwargs)

    @classmethod
    def _parse_from_yaml(cls, path, *args, **kwargs):
        return read_yaml_with_bases(path)


def load_config(path, learning_rate=None, batch_size=None, iters=None, opts=None, training=True):
    """Read a PaddleSeg-style YAML config, with command-line overrides, into a ``paddleseg`` Config.

    ``training`` False (export, evaluation, prediction) asks only for ``model`` and ``val_dataset``.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with paddleseg_errors_only():
            cfg = _SafeConfig(path, learning_rate=learning_rate, batch_size=batch_size, iters=iters, opts=opts,
                              checker=_Checks(training))
    except ConfigError:
        raise
    except (AssertionError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: {str(err).strip()}") from None
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


def _class_called_in(traceback):
    """The first class named in the innermost frame of ``traceback`` (a factory such as ResNet18_vd,
    whose call of its class failed), or None."""
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    frame = traceback.tb_frame
    return next((value for value in (frame.f_globals.get(name) for name in frame.f_code.co_names)
                 if inspect.isclass(value)), None)


def _argument_names(component):
    """Keyword arguments ``component`` accepts, or None when it takes any (**kwargs) or can't be read."""
    try:
        parameters = inspect.signature(component).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters]


def _takes_weights(component_class):
    """Whether ``component_class`` accepts a ``pretrained`` argument (or any keyword, as factories do)."""
    known = _argument_names(component_class)
    return known is None or 'pretrained' in known


class Builder(SegBuilder):
    """PaddleSeg's builder, with errors that name the config key and the closest known name.

    A ``type:`` name is this package's component first (``emanet.registry.component``: its Paddle 3
    losses and checked datasets in place of PaddleSeg's, ``PaddleSeg<Name>`` for PaddleSeg's own),
    then PaddleSeg's registries'. A config without ``train_dataset`` (see ``load_config``) builds its
    model from ``model`` and the val set. The config is not logged piece by piece; ``save_config``
    writes it whole.
    """

    def __init__(self, config):
        super().__init__(config)
        self.path = getattr(config, 'path', 'config')
        registry.log_replacement_notice_once()

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
        ours = registry.component(class_type)
        if ours is not None:
            return ours
        for components in self.comp_list:
            if class_type in components.components_dict:
                return components[class_type]
        known = registry.names() + [name for components in self.comp_list for name in components.components_dict]
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
            match = re.search(r"(?:(\w+)\.)?__init__\(\) got an unexpected keyword argument '(\w+)'", str(err))
            if not match:
                raise
            if match.group(1):
                target = getattr(inspect.getmodule(component_class), match.group(1), None)
            else:  # Python 3.9 leaves the class out of the message: the class the factory calls
                target = _class_called_in(err.__traceback__)
            known = _argument_names(target) or ()
            raise ConfigError(f"{self.path}: {name} has no argument '{match.group(2)}'"
                              f"{closest(match.group(2), known)}") from None

    def build_component(self, cfg):
        """Build as PaddleSeg does, but load every component's ``pretrained`` weights ourselves.

        PaddleSeg's models and backbones hand ``pretrained`` to ``paddle.load``, a plain unpickler that
        runs whatever code the file names; here the argument never reaches a constructor. The component
        is built without it, then ``load_weights`` reads the file: strictly for this package's models, as
        their own ``pretrained`` does; for PaddleSeg's, the weights that fit load and the others are named
        in a warning, as PaddleSeg's loader does.
        """
        if isinstance(cfg, dict) and cfg.get('pretrained') is not None and 'type' in cfg:
            component_class = self.load_component_class(cfg['type'])
            if _takes_weights(component_class):
                return self._build_and_load(component_class, cfg)
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

    def _build_and_load(self, component_class, cfg):
        weights = cfg['pretrained']
        if not isinstance(weights, str):
            raise ConfigError(f"{self.path}: pretrained of {cfg['type']} is a {type(weights).__name__}; "
                              f"it names a weights file or URL")
        component = self.build_component({key: value for key, value in cfg.items() if key != 'pretrained'})
        if not isinstance(component, paddle.nn.Layer):
            raise ConfigError(f"{self.path}: {cfg['type']} holds no weights to load from pretrained")
        return load_weights(component, weights, strict=component_class.__module__.startswith('emanet.'))


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
