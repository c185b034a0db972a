"""Prediction on image files: the one image loop, for any Segmenter; label maps saved as
pseudo-colour PNGs and overlays, or as official label ids; rasters (GeoTIFFs, images larger than OpenCV
decodes) as GeoTIFFs of labels, window by window (``emanet.rasters``).

Reading and preparing the next image and writing the last one's results run in threads beside the
model (OpenCV, numpy and PNG encoding release the GIL), with at most ``AHEAD`` images waiting on each
side, so a folder goes at the model's speed in bounded memory.
"""
import collections
import concurrent.futures
import io
import os
import uuid

import cv2
import numpy as np
from paddleseg.utils.visualize import get_color_map_list
from PIL import Image
from tqdm import tqdm

from emanet.errors import InvalidInput
from emanet.rasters import RasterOptions, import_rasterio, is_raster, predict_raster
from emanet.rasters import output_path as raster_output_path
from emanet.tiles import overlay, read_ahead

AHEAD = 2  # images read ahead of the model, and results waiting to be written

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
SAVE_FORMATS = ('pseudo_color', 'cityscapes')


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


def output_names(paths, root):
    """A name per image for its results: its path under ``root`` without the suffix.

    A list file may name images anywhere (``../other/x.jpg``, ``/data/x.jpg``); such an image is
    named by its file name alone, so that no result is ever written outside the save folder. Two
    images that would get one name are one error naming both.
    """
    names, first_with_name = [], {}
    for path in paths:
        relative = os.path.relpath(path, root)
        if os.path.isabs(relative) or relative.split(os.sep)[0] == os.pardir:
            relative = os.path.basename(path)
        name = os.path.splitext(relative)[0]
        if name in first_with_name:
            raise InvalidInput(f"{first_with_name[name]} and {path} would both be saved as '{name}'; "
                               "list images with distinct file names")
        first_with_name[name] = path
        names.append(name)
    return names


def color_map(palette=None):
    """A flat [r, g, b, r, g, b, ...] list: the dataset's palette if it has one, else PaddleSeg's."""
    if palette is not None:
        return [channel for rgb in palette for channel in rgb] + [0, 0, 0] * (256 - len(palette))
    return get_color_map_list(256)


def pseudo_color_image(label, colors):
    """PaddleSeg's ``get_pseudo_color_map`` (a palette PIL image, the same PNG bytes) without its two copies of
    the labels: the image maps the memory of ``label`` [H, W] uint8 (256 MB saved at 16384x16384)."""
    label = np.ascontiguousarray(label, dtype=np.uint8)
    image = Image.frombuffer('P', (label.shape[1], label.shape[0]), label, 'raw', 'P', 0, 1)
    image.putpalette(colors)
    return image


def pseudo_color_paths(save_dir, name):
    """Where ``save_pseudo_color`` writes the results of the image named ``name``: (mask PNG, overlay JPEG)."""
    return (os.path.join(save_dir, 'pseudo_color_prediction', name + '.png'),
            os.path.join(save_dir, 'added_prediction', name + '.jpg'))


def write_atomically(path, data, temp_tag=''):
    """Write ``data`` (bytes) as ``path`` whole or not at all: into a temporary file beside it, then renamed
    over it, so that a file present is a file complete, and a writer killed midway leaves only a file named
    ``<path>.<temp_tag>-<random>.tmp`` (``temp_tag``: a run's own mark, so that it can delete those)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    temp_path = f"{path}.{temp_tag}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp_path, 'wb') as f:
            f.write(data)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def _encoded(path, ok_and_buffer):
    ok, buffer = ok_and_buffer
    if not ok:
        raise OSError(f"could not encode {path}")
    return buffer.tobytes()


def save_pseudo_color(image, label, save_dir, name, colors, temp_tag=''):
    """Write ``label`` [H, W] uint8 as save_dir/pseudo_color_prediction/<name>.png and its overlay on
    ``image`` (BGR uint8, blended in place) as save_dir/added_prediction/<name>.jpg (PaddleSeg's
    folder names and pixels), each whole or not at all (``write_atomically``)."""
    mask_path, overlay_path = pseudo_color_paths(save_dir, name)
    mask = io.BytesIO()
    pseudo_color_image(label, colors).save(mask, format='PNG')
    write_atomically(mask_path, mask.getvalue(), temp_tag)
    overlaid = cv2.imencode('.jpg', overlay(image, label, colors, weight=0.6))
    write_atomically(overlay_path, _encoded(overlay_path, overlaid), temp_tag)


def save_label_ids(label, save_dir, name, label_ids, temp_tag=''):
    """Write the official ids of ``label`` (train ids) as save_dir/<name>.png, one channel, whole or not at all."""
    path = os.path.join(save_dir, name + '.png')
    write_atomically(path, _encoded(path, cv2.imencode('.png', np.asarray(label_ids, np.uint8)[label])), temp_tag)


def predict_images(segmenter, image_path, save_dir, palette=None, save_format='pseudo_color', label_ids=None,
                   output_format=None, raster_options=None):
    """Predict every image under ``image_path`` (an image, a folder or a list file) with ``segmenter``
    (any ``emanet.segmenter.Segmenter``) and write the results to ``save_dir``; return the count.

    ``save_format`` 'pseudo_color' writes coloured masks and overlays (``palette``: the dataset's
    colours, else PaddleSeg's); 'cityscapes' writes single-channel PNGs of official label ids
    (``label_ids``, the dataset's ``LABEL_IDS``: one id per train id), named after each image,
    as the Cityscapes evaluation server and ``cityscapesscripts`` read them.

    Rasters (``emanet.rasters.is_raster``: GeoTIFFs and TIFFs larger than OpenCV decodes, or every image with
    ``output_format`` 'geotiff') are read and written window by window as save_dir/<name>.tif, a GeoTIFF of
    labels with the palette as its colour table (``raster_options``: bands, scaling, confidence).
    """
    if save_format not in SAVE_FORMATS:
        raise InvalidInput(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got '{save_format}'")
    if save_format == 'cityscapes' and label_ids is None:
        raise InvalidInput("save_format 'cityscapes' needs the dataset's official label ids; the config's val "
                         "dataset has none (it is not Cityscapes): use save_format pseudo_color")
    paths, root = list_images(image_path)
    colors = color_map(palette)
    names = output_names(paths, root)
    raster = [is_raster(path, output_format) for path in paths]
    rasters = [(path, name) for path, name, is_one in zip(paths, names, raster) if is_one]
    if rasters:
        import_rasterio()
        if save_format != 'pseudo_color':
            raise InvalidInput(f"{rasters[0][0]} is written as a GeoTIFF of labels; save_format {save_format} "
                               "writes PNGs (use --output_format png)")
    images = [(path, name) for path, name, is_one in zip(paths, names, raster) if not is_one]

    def save(image, label, name):
        if save_format == 'cityscapes':
            save_label_ids(label, save_dir, name, label_ids)
        else:
            save_pseudo_color(image, label, save_dir, name, colors)

    with concurrent.futures.ThreadPoolExecutor(1, 'emanet-read') as reader, \
            concurrent.futures.ThreadPoolExecutor(1, 'emanet-write') as writer:
        prepared = read_ahead(reader, segmenter.prepare, [path for path, _ in images], AHEAD)
        writing = collections.deque()
        for (_, name), item in tqdm(zip(images, prepared), total=len(images), desc='predict', unit='image',
                                    disable=not images):
            label = segmenter.predict_prepared(item).astype(np.uint8, copy=False)
            writing.append(writer.submit(save, item[0], label, name))
            while len(writing) > AHEAD:
                writing.popleft().result()  # a failed write stops the loop here
        for future in writing:
            future.result()
    for path, name in rasters:
        predict_raster(segmenter, path, raster_output_path(save_dir, name), colors, raster_options or RasterOptions())
    return len(paths)

