"""running_loader: a bad sample is an exception where its batch comes out, for any loop over the loader."""
import threading
import time
import types

import paddle
import pytest
from paddle.io.dataloader import dataloader_iter

from conftest import CONFIG
from emanet.config import Builder, load_config
from emanet.data.loading import EvalSamples, SampleError, collate_one, running_loader


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_plain_loop_over_the_loader_raises_the_sample_error_naming_the_file(tmp_path, num_workers, tiny_dataset):
    (tmp_path / 'config.yml').write_text(CONFIG.format(root=tiny_dataset))
    dataset = Builder(load_config(str(tmp_path / 'config.yml'), training=False)).val_dataset
    dataset.file_list = dataset.file_list[:1] + [[str(tmp_path / 'missing.jpg'), dataset.file_list[0][1]]]
    loader = paddle.io.DataLoader(EvalSamples(dataset), batch_size=1, num_workers=num_workers,
                                  collate_fn=collate_one, return_list=True)
    seen = []
    with pytest.raises(SampleError, match=r'missing\.jpg: missing'):
        with running_loader(loader) as batches:
            for image, label, _ in batches:  # no check in the loop: the error comes out as an exception
                seen.append(image.shape)
    assert len(seen) == 1 and len(seen[0]) == 4  # the good image came through as an image [1, 3, H, W]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_a_loop_left_early_ends_the_reader_thread_with_the_block(tmp_path, tiny_dataset, monkeypatch, num_workers):
    """Without workers Paddle looks at its reader thread once a second; with workers it leaves it reading the
    queue it closes, for up to 5 s. Either way the thread has ended when the block ends, without a wait."""
    def no_sleep(seconds):
        raise AssertionError(f'the loader waited {seconds} s for its thread')

    monkeypatch.setattr(dataloader_iter, 'time', types.SimpleNamespace(**dict(vars(time), sleep=no_sleep)))
    (tmp_path / 'config.yml').write_text(CONFIG.format(root=tiny_dataset))
    dataset = Builder(load_config(str(tmp_path / 'config.yml'), training=False)).val_dataset
    dataset.file_list = dataset.file_list * 50  # more than the loader's queue holds
    loader = paddle.io.DataLoader(EvalSamples(dataset), batch_size=1, num_workers=num_workers,
                                  collate_fn=collate_one, return_list=True)
    before = set(threading.enumerate())
    with running_loader(loader) as batches:
        next(batches)
        # Paddle's reader thread (multiprocessing's queue feeders, which end as their queues close, are not it)
        readers = [thread for thread in threading.enumerate()
                   if thread not in before and not thread.name.startswith('QueueFeederThread')]
        assert readers and all(reader.is_alive() for reader in readers)  # still reading, the queue being full
    assert not any(reader.is_alive() for reader in readers), [reader.name for reader in readers]
