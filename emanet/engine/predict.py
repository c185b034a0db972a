"""Prediction on image files: label maps saved as pseudo-colour PNGs and overlays."""
import os

import cv2
import numpy as np
import paddle
from paddleseg.transforms import Compose
from paddleseg.utils.visualize import get_color_map_list, get_pseudo_color_map, visualize
from tqdm import tqdm

from emanet.data.cityscapes import TRAIN_ID_TO_ID
from emanet.engine.evaluate import predict_logits
from emanet.engine.inference import reverse_transform

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def list_images(image_path):
    """Image files from one image, a folder (searched recursively) or a list file (first column).

    Returns (paths, root): names under ``root`` are kept when saving results.
    """
    if os.path.isdir(image_path):
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(image_path)
                       for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        root = image_path
    elif image_path.lower().endswith(IMAGE_SUFFIXES):
        paths, root = [image_path], os.path.dirname(image_path)
    elif os.path.isfile(image_path):
        root = os.path.dirname(image_path)
        with open(image_path) as f:
            paths = [os.path.join(root, line.split()[0]) for line in f if line.strip()]
    else:
        raise FileNotFoundError(f"image path not found: {image_path}")
    if not paths:
        raise FileNotFoundError(f"no images found in {image_path}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{image_path} lists {len(missing)} missing image(s), e.g. {missing[0]}")
    return paths, root


def color_map(palette=None):
    """A flat [r, g, b, r, g, b, ...] list: the dataset's palette if it has one, else PaddleSeg's."""
    if palette is not None:
        return [channel for rgb in palette for channel in rgb] + [0, 0, 0] * (256 - len(palette))
    return get_color_map_list(256)


def predict_label(model, transforms, image_path, **augment):
    """Label map [H, W] (uint8 or int) at the image's original size."""
    data = transforms({'img': image_path, 'trans_info': [], 'gt_fields': []})
    images = paddle.to_tensor(data['img'][None].astype('float32'))
    logits = reverse_transform(predict_logits(model, images, **augment), data['trans_info'])
    return paddle.argmax(logits, axis=1)[0].numpy()


SAVE_FORMATS = ('pseudo_color', 'cityscapes')


def save_pseudo_color(image_path, label, save_dir, name, colors):
    """Write ``label`` [H, W] uint8 as save_dir/pseudo_color_prediction/<name>.png and its overlay
    on the image as save_dir/added_prediction/<name>.jpg (PaddleSeg's folder names)."""
    mask_path = os.path.join(save_dir, 'pseudo_color_prediction', name + '.png')
    overlay_path = os.path.join(save_dir, 'added_prediction', name + '.jpg')
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    os.makedirs(os.path.dirname(overlay_path), exist_ok=True)
    get_pseudo_color_map(label, colors).save(mask_path)
    cv2.imwrite(overlay_path, visualize(image_path, label, colors, weight=0.6))


def predict(model, transforms, image_path, save_dir, palette=None, save_format='pseudo_color', **augment):
    """Predict every image under ``image_path`` and write the results to ``save_dir``.

    ``transforms`` is a list of PaddleSeg transforms (the config's val transforms).
    ``save_format`` 'pseudo_color' writes coloured masks and overlays; 'cityscapes' writes
    single-channel PNGs of official Cityscapes label ids, named after each image, as the
    Cityscapes evaluation server and ``cityscapesscripts`` read them.
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got '{save_format}'")
    paths, root = list_images(image_path)
    transforms = Compose(transforms)
    colors = color_map(palette)
    model.eval()
    with paddle.no_grad():
        for path in tqdm(paths, desc='predict', unit='image'):
            label = predict_label(model, transforms, path, **augment).astype(np.uint8)
            name = os.path.splitext(os.path.relpath(path, root))[0]
            if save_format == 'cityscapes':
                label_ids_path = os.path.join(save_dir, name + '.png')
                os.makedirs(os.path.dirname(label_ids_path), exist_ok=True)
                cv2.imwrite(label_ids_path, TRAIN_ID_TO_ID[label])
                continue
            save_pseudo_color(path, label, save_dir, name, colors)
    return len(paths)
