"""PaddleSeg's generic list-file ``Dataset``, checking up front that every listed file exists."""
from paddleseg.datasets import Dataset as PaddleSegDataset

from emanet.data.files import require_files


class Dataset(PaddleSegDataset):
    """A drop-in for ``paddleseg.datasets.Dataset`` (same arguments: ``mode, dataset_root, transforms,
    num_classes, train_path, val_path, test_path, separator, ignore_index, ...``).

    Each line of the list file names an image and its label, so pairs cannot shift; but a listed
    file that does not exist is reported here, in the constructor, rather than mid-training.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        paths = [path for pair in self.file_list for path in pair if path is not None]
        require_files(paths, f'files listed for the {self.mode} split of {self.dataset_root}')
