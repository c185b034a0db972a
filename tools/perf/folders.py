"""Any image, any folder: a folder predicted end to end (``predict_images``, tools/infer.py's loop) against the
model alone in the same process, and a sliding window over one large image against a folder-sized image
(``perf.measure`` runs each in a worker process and adds its peak memory)."""
import os
import statistics
import tempfile
import time

import cv2
import numpy as np

from emanet.engine.predict import list_images, predict_images
from emanet.test_time import InferenceOptions

# The runtimes of these rows: (the benchmark part that runs it, its export, its backend).
RUNTIMES = {'paddle_fp32': ('inference', 'paddle', 'paddle'), 'openvino_int8': ('runtimes', 'openvino_int8', 'openvino')}

BLOCK = 64  # pixels of each random colour block of the synthetic images


def write_image(path, size, seed):
    """A synthetic image (w, h) as an image file: random colour blocks under tiled noise, so that the model and the
    PNG codec see texture. Built and written in one array of the image's size (the reader's memory is what counts)."""
    width, height = size
    if not cv2.imwrite(path, SyntheticImage(width, height, seed).rows(0, height), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {path}")
    return path


def write_geotiff(path, size, seed, rows_at_once=16 * BLOCK):
    """The same kind of synthetic image (w, h) as a tiled, deflate-compressed RGB GeoTIFF (UTM 33N, 1 m pixels),
    written ``rows_at_once`` rows at a time, so that 65536x65536 (12 GiB of pixels) is made in bounded memory."""
    import rasterio
    from affine import Affine
    width, height = size
    image = SyntheticImage(width, height, seed)
    profile = dict(driver='GTiff', width=width, height=height, count=3, dtype='uint8', crs='EPSG:32633',
                   transform=Affine(1.0, 0.0, 500000.0, 0.0, -1.0, 4000000.0), tiled=True, blockxsize=512,
                   blockysize=512, compress='deflate', zlevel=1, photometric='RGB', BIGTIFF='IF_SAFER')
    with rasterio.Env(GDAL_CACHEMAX=256 << 20), rasterio.open(path, 'w', **profile) as raster:
        for top in range(0, height, rows_at_once):
            bgr = image.rows(top, min(rows_at_once, height - top))
            raster.write(bgr[:, :, ::-1].transpose(2, 0, 1), window=rasterio.windows.Window(0, top, width, len(bgr)))
    return path


class SyntheticImage:
    """Random colour blocks of BLOCK pixels under noise that repeats every 1024 pixels, made rows at a time."""

    def __init__(self, width, height, seed):
        self.width, self.height = width, height
        self.rng = np.random.RandomState(seed)
        self.noise = self.rng.randint(0, 64, (min(height, 1024), min(width, 1024), 3), np.uint8)

    def rows(self, top, count):
        """BGR rows [top, top + count), asked for in order from the top, ``top`` a multiple of BLOCK."""
        image = np.empty((count, self.width, 3), np.uint8)
        for block_top in range(0, count, BLOCK):
            blocks = self.rng.randint(0, 192, (-(-self.width // BLOCK), 3), np.uint8)
            image[block_top:block_top + BLOCK] = np.repeat(blocks, BLOCK, axis=0)[:self.width]
        noise = self.noise[(top + np.arange(count)) % self.noise.shape[0]]  # [count, 1024, 3]
        for left in range(0, self.width, noise.shape[1]):
            tile = image[:, left:left + noise.shape[1]]
            tile += noise[:, :tile.shape[1]]
        return image


def model_seconds(segmenter, paths):
    """Seconds of the segmenter's ``run`` alone (the runtime's call) on each image's preprocessed input; reading
    and preprocessing are not timed."""
    seconds = 0.0
    for path in paths:
        model_input, _ = segmenter.preprocess(path)
        batch = model_input[None]
        start = time.perf_counter()
        segmenter.run(batch)
        seconds += time.perf_counter() - start
    return seconds


def folder_speed(segmenter, folder, repeats=2):
    """Images/s of ``predict_images`` over ``folder`` (masks and overlays written to a temporary folder) against
    the segmenter's ``run`` alone on the same images, alternating ``repeats`` times; the medians are compared."""
    paths, _ = list_images(folder)
    model_s, end_to_end_s = [], []
    model_seconds(segmenter, paths[:1])  # warm-up: the runtime's first call plans its kernels
    for _ in range(repeats):
        model_s.append(model_seconds(segmenter, paths))
        with tempfile.TemporaryDirectory(prefix='emanet_folder_') as save_dir:
            start = time.perf_counter()
            predict_images(segmenter, folder, save_dir)
            end_to_end_s.append(time.perf_counter() - start)
    model_rate = len(paths) / statistics.median(model_s)
    end_to_end_rate = len(paths) / statistics.median(end_to_end_s)
    return {'images': len(paths), 'model_s': model_s, 'end_to_end_s': end_to_end_s,
            'model_images_per_s': model_rate, 'end_to_end_images_per_s': end_to_end_rate,
            'share_of_model': end_to_end_rate / model_rate}


def sliding_window(window):
    """Windows of ``window`` (w, h) side by side: every pixel is predicted once, by one window."""
    return InferenceOptions(is_slide=True, crop_size=tuple(window), stride=tuple(window))


def raster_output_check(path, save_dir):
    """Whether the GeoTIFF written for the raster ``path`` has its CRS, transform and size, and a colour table."""
    import rasterio
    from emanet.rasters import output_path
    written = output_path(save_dir, os.path.splitext(os.path.basename(path))[0])
    with rasterio.open(path) as source, rasterio.open(written) as output:
        colors = output.colormap(1)
        return {'crs': str(output.crs), 'size': [output.width, output.height], 'dtype': output.dtypes[0],
                'colour_table_entries': len(colors), 'nodata': output.nodata,
                'same_crs_transform_size': (output.crs == source.crs and output.transform == source.transform
                                            and (output.width, output.height) == (source.width, source.height))}


def large_image_speed(segmenter, image_path, image_size, reference_path, reference_size):
    """Seconds and seconds per megapixel of ``predict_images`` on the reference image, then on the large one (same
    segmenter, so the same windows), after one untimed reference prediction (the runtime's first call)."""
    with tempfile.TemporaryDirectory(prefix='emanet_large_') as save_dir:
        predict_images(segmenter, reference_path, save_dir)
    result = {}
    for name, path, (width, height) in (('reference', reference_path, reference_size),
                                        ('large', image_path, image_size)):
        with tempfile.TemporaryDirectory(prefix='emanet_large_') as save_dir:
            start = time.perf_counter()
            predict_images(segmenter, path, save_dir)
            seconds = time.perf_counter() - start
            if name == 'large' and path.endswith('.tif'):
                result['georeference'] = raster_output_check(path, save_dir)
        result[f'{name}_s'] = seconds
        result[f'{name}_s_per_mpx'] = seconds / (width * height / 1e6)
    result['s_per_mpx_over_reference'] = result['large_s_per_mpx'] / result['reference_s_per_mpx']
    return result
