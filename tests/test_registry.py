"""`import emanet` makes PaddleSeg's YAML pipeline build this package's model."""
import subprocess
import sys
import textwrap

import pytest
from paddleseg.cvlibs import Config, SegBuilder, manager

import emanet
import emanet.data.cityscapes
import emanet.registry


def test_paddleseg_yaml_builds_our_emanet(tmp_path):
    path = tmp_path / 'model.yml'
    (tmp_path / 'train.txt').write_text('')
    path.write_text(textwrap.dedent('''
        batch_size: 2
        iters: 10
        train_dataset:
          type: Dataset
          dataset_root: {root}
          train_path: {root}/train.txt
          num_classes: 6
          mode: train
          transforms: []
        optimizer: {{type: SGD}}
        lr_scheduler: {{type: PolynomialDecay, learning_rate: 0.01}}
        loss: {{types: [{{type: CrossEntropyLoss}}], coef: [1, 0.4]}}
        model:
          type: EMANet
          num_classes: 6
          backbone:
            type: ResNet18_vd
            output_stride: 8
          num_bases: 16
          enable_auxiliary_loss: True
    '''.format(root=tmp_path)))

    model = SegBuilder(Config(str(path))).model
    assert type(model) is emanet.EMANet
    assert manager.MODELS['EMANet'] is emanet.EMANet
    assert model.head.emau.mu.shape == [1, 512, 16]


def test_paddlesegs_replaced_components_stay_reachable():
    import paddleseg.datasets
    import paddleseg.models
    from emanet.registry import paddleseg_original
    assert manager.DATASETS['Cityscapes'] is emanet.data.cityscapes.Cityscapes
    assert manager.DATASETS['PaddleSegCityscapes'] is paddleseg.datasets.Cityscapes
    assert manager.LOSSES['PaddleSegCrossEntropyLoss'] is paddleseg.models.CrossEntropyLoss
    assert manager.MODELS['PaddleSegEMANet'] is paddleseg.models.EMANet
    assert paddleseg_original('PascalVOC') is paddleseg.datasets.PascalVOC
    with pytest.raises(KeyError, match="replaced no PaddleSeg component named 'ResNet50_vd'"):
        paddleseg_original('ResNet50_vd')


def test_import_says_once_what_it_replaced_and_how_to_reach_the_originals():
    result = subprocess.run([sys.executable, '-c', 'import emanet'], capture_output=True, text=True, check=True)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "emanet replaces PaddleSeg's" in line]
    assert len(lines) == 1
    assert ("emanet replaces PaddleSeg's EMANet, CrossEntropyLoss, OhemCrossEntropyLoss, Dataset, Cityscapes, "
            "PascalVOC in PaddleSeg's registries") in lines[0]
    assert 'type: PaddleSeg<Name>' in lines[0]


def test_registering_again_keeps_paddlesegs_classes_as_the_originals():
    import paddleseg.datasets
    emanet.registry.register_all()
    assert manager.DATASETS['PaddleSegCityscapes'] is paddleseg.datasets.Cityscapes
    assert manager.DATASETS['Cityscapes'] is emanet.data.cityscapes.Cityscapes
