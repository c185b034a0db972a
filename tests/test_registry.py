"""`type:` names: PaddleSeg's YAML pipeline builds our EMANet; our builder also builds our Paddle 3 losses
and checked datasets, and PaddleSeg's own under `PaddleSeg<Name>`."""
import subprocess
import sys
import textwrap

import paddleseg.datasets
import paddleseg.models
import pytest
from paddleseg.cvlibs import Config, SegBuilder, manager

import emanet
import emanet.data.dataset
import emanet.models.losses
from emanet.config import Builder, ConfigError, load_config
from emanet.registry import paddleseg_original

MODEL = '''
model:
  type: EMANet
  num_classes: 6
  backbone:
    type: ResNet18_vd
    output_stride: 8
  num_bases: 16
  enable_auxiliary_loss: True
'''


def write_config(tmp_path, dataset='Dataset', loss='CrossEntropyLoss'):
    path = tmp_path / 'model.yml'
    (tmp_path / 'train.txt').write_text('')
    path.write_text(textwrap.dedent('''
        batch_size: 2
        iters: 10
        train_dataset:
          type: {dataset}
          dataset_root: {root}
          train_path: {root}/train.txt
          num_classes: 6
          mode: train
          transforms: []
        optimizer: {{type: SGD}}
        lr_scheduler: {{type: PolynomialDecay, learning_rate: 0.01}}
        loss: {{types: [{{type: {loss}}}], coef: [1, 0.4]}}
    ''').format(root=tmp_path, dataset=dataset, loss=loss) + MODEL)
    return str(path)


def test_paddleseg_yaml_builds_our_emanet_in_paddlesegs_own_builder(tmp_path):
    model = SegBuilder(Config(write_config(tmp_path))).model
    assert type(model) is emanet.EMANet
    assert manager.MODELS['EMANet'] is emanet.EMANet
    assert model.head.emau.mu.shape == [1, 512, 16]


def test_our_builder_builds_our_losses_and_datasets_and_paddleseg_keeps_its_own(tmp_path):
    builder = Builder(load_config(write_config(tmp_path)))
    assert type(builder.model) is emanet.EMANet
    assert [type(loss) for loss in builder.loss['types']] == [emanet.models.losses.CrossEntropyLoss] * 2
    assert builder.train_dataset_class is emanet.data.dataset.Dataset
    assert manager.LOSSES['CrossEntropyLoss'] is paddleseg.models.CrossEntropyLoss
    assert manager.DATASETS['Cityscapes'] is paddleseg.datasets.Cityscapes


def test_paddlesegs_replaced_components_stay_reachable(tmp_path):
    builder = Builder(load_config(write_config(tmp_path, loss='PaddleSegCrossEntropyLoss')))
    assert type(builder.loss['types'][0]) is paddleseg.models.CrossEntropyLoss
    assert builder.load_component_class('PaddleSegCityscapes') is paddleseg.datasets.Cityscapes
    assert builder.load_component_class('PaddleSegEMANet') is paddleseg.models.EMANet
    assert paddleseg_original('PascalVOC') is paddleseg.datasets.PascalVOC
    assert paddleseg_original('EMANet') is paddleseg.models.EMANet
    with pytest.raises(KeyError, match="replaces no PaddleSeg component named 'ResNet50_vd'"):
        paddleseg_original('ResNet50_vd')


def test_an_unknown_type_names_the_closest_of_ours_too(tmp_path):
    builder = Builder(load_config(write_config(tmp_path)))
    with pytest.raises(ConfigError, match="unknown type 'StreetScene' \\(did you mean 'StreetScenes'\\?\\)"):
        builder.load_component_class('StreetScene')


@pytest.mark.slow  # a fresh process
def test_the_builder_says_once_what_it_uses_instead_of_paddlesegs_and_how_to_reach_those(tmp_path):
    path = write_config(tmp_path)
    probe = ("from emanet.config import Builder, load_config; from emanet.logger import setup_logging; "
             f"setup_logging(); Builder(load_config({path!r})).model; Builder(load_config({path!r})).loss")
    result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if 'instead of PaddleSeg' in line]
    assert len(lines) == 1
    assert ("emanet's builder and tools use its own EMANet, CrossEntropyLoss, OhemCrossEntropyLoss, Dataset, "
            "Cityscapes, PascalVOC instead of PaddleSeg's") in lines[0]
    assert 'type: PaddleSeg<Name>' in lines[0]
