"""PaddleSeg's generic list-file ``Dataset``, checking up front that every listed file exists, and the
constructor the named datasets (Cityscapes, Pascal VOC) share."""
from paddleseg.datasets import Dataset as PaddleSegDataset
from paddleseg.transforms import Compose

from emanet.data.files import require_files
from emanet.errors import InvalidInput


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


class NamedDataset(PaddleSegDataset):
    """A data set with a fixed class table (``NUM_CLASSES``, ``IGNORE_INDEX``) whose constructor lists one
    split's files and checks them: the constructor of PaddleSeg 2.8.0's Cityscapes and PascalVOC
    (same arguments and attributes), with ``list_files(dataset_root, mode)`` giving ``file_list``.
    """
    NUM_CLASSES = None
    IGNORE_INDEX = 255
    IMG_CHANNELS = 3
    MODES = ()

    def __init__(self, transforms, dataset_root=None, mode='train', edge=False):
        self.dataset_root = dataset_root
        self.transforms = Compose(transforms)
        self.mode = mode.lower()
        self.num_classes = self.NUM_CLASSES
        self.ignore_index = self.IGNORE_INDEX
        self.edge = edge
        if self.mode not in self.MODES:
            raise InvalidInput(f"mode should be one of {self.MODES}, but got {mode!r}.")
        self.file_list = self.list_files(dataset_root, self.mode)

    @staticmethod
    def list_files(dataset_root, mode):
        """[[image path, label path], ...] of the split ``mode``, each file checked."""
        raise NotImplementedError
