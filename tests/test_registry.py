"""`import emanet` makes PaddleSeg's YAML pipeline build this package's model."""
import textwrap

from paddleseg.cvlibs import Config, SegBuilder, manager

import emanet


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
