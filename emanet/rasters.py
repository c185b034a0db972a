"""Rasters of any size (GeoTIFFs of 50k-200k pixels a side): windows read straight from the file, labels
written strip by strip into a tiled, deflate-compressed GeoTIFF with the input's georeference.

OpenCV refuses images over 2^30 pixels and the image path holds the decoded image in memory; here GDAL
(inside rasterio's wheel, the optional ``[geo]`` extra) reads each sliding window of the chosen bands
(``bands``, 1-based as in GDAL, given as red green blue), scales it to 0-255 (``scale``: one linear range,
or ``percentile_stretch``: each band's percentiles of a decimated read, overviews when the file has them),
and ``emanet.tiles.stream_strips`` blends the windows' logits exactly as the in-memory sliding window does.
Windows are read and prepared ahead of the model on one thread and strips written behind it on another,
so memory holds the windows of about one row and the scores where rows of windows overlap.

The output has the input's size, CRS and geotransform, uint8 labels (uint16 past 255 classes) with 255
(65535) as nodata, the tools' palette as a colour table, and optionally a second band of confidence (the
top class's probability on 0-254). Input nodata (a nodata value, an alpha or mask band) is written as
nodata, and windows entirely nodata never reach the model.

Whether a file takes this path is read from its TIFF header (``read_tiff_header``: a GeoTIFF, or more
pixels than OpenCV decodes), without rasterio, so that a GeoTIFF without the extra ends in one sentence.
"""
import dataclasses
import os
import struct

import numpy as np
from tqdm import tqdm

from emanet.errors import InvalidInput, Unsupported
from emanet.logger import logger
from emanet.test_time import window_starts
from emanet.tiles import stream_strips

TIFF_SUFFIXES = ('.tif', '.tiff')
OUTPUT_FORMATS = ('png', 'geotiff')
# OpenCV's decoders refuse images of more pixels than this (CV_IO_MAX_IMAGE_PIXELS).
OPENCV_MAX_PIXELS = 1 << 30
# The first IFD of a TIFF lists its tags; a real one has a few dozen. More is a lying header.
MAX_TIFF_TAGS = 4096
# GeoTIFF's tags: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory.
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
WIDTH_TAG, HEIGHT_TAG = 256, 257
# GDAL's block cache: enough for the tiles under a row of windows of a tiled file, far below GDAL's default
# (5% of the machine's memory), which would count against the peak for nothing on a file read once.
GDAL_CACHE_BYTES = 256 << 20
OUTPUT_BLOCK = 256
# Pixels of the decimated read that percentile stretches are computed from.
STRETCH_SAMPLE_PIXELS = 1 << 20
STRIPS_BEHIND = 2


@dataclasses.dataclass(frozen=True)
class TiffHeader:
    width: int
    height: int
    georeferenced: bool


def read_tiff_header(path):
    """The size and whether it is georeferenced of the TIFF or BigTIFF ``path`` (its first image), from
    its header alone; None for a file that is not a TIFF. A header that ends early or lies is one error
    naming the file."""
    with open(path, 'rb') as file:
        head = file.read(16)
        if head[:4] not in (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+'):
            return None
        order = '<' if head[:2] == b'II' else '>'
        big = head[2:4] in (b'+\x00', b'\x00+')
        if big:
            if len(head) < 16:
                raise InvalidInput(f"{path}: the BigTIFF header ends early")
            offset = struct.unpack(order + 'Q', head[8:16])[0]
            count_format, entry_size = 'Q', 20
        else:
            if len(head) < 8:
                raise InvalidInput(f"{path}: the TIFF header ends early")
            offset = struct.unpack(order + 'I', head[4:8])[0]
            count_format, entry_size = 'H', 12
        if offset > os.fstat(file.fileno()).st_size:
            raise InvalidInput(f"{path}: the TIFF's first directory (at byte {offset}) is past the end of the file")
        file.seek(offset)
        count_bytes = file.read(struct.calcsize(count_format))
        if len(count_bytes) < struct.calcsize(count_format):
            raise InvalidInput(f"{path}: the TIFF's first directory (at byte {offset}) is past the end of the file")
        count = struct.unpack(order + count_format, count_bytes)[0]
        if count > MAX_TIFF_TAGS:
            raise InvalidInput(f"{path}: the TIFF's first directory claims {count} tags, more than {MAX_TIFF_TAGS}")
        entries = file.read(count * entry_size)
    if len(entries) < count * entry_size:
        raise InvalidInput(f"{path}: the TIFF's first directory ends early")
    tags = {}
    for index in range(count):
        entry = entries[index * entry_size:(index + 1) * entry_size]
        tag, kind = struct.unpack(order + 'HH', entry[:4])
        value = entry[12:] if big else entry[8:]
        # A width or height is one SHORT (type 3) or LONG (4, or LONG8 16 in a BigTIFF), stored in the entry.
        if kind == 3:
            tags[tag] = struct.unpack(order + 'H', value[:2])[0]
        elif kind == 4:
            tags[tag] = struct.unpack(order + 'I', value[:4])[0]
        elif kind == 16 and big:
            tags[tag] = struct.unpack(order + 'Q', value)[0]
        else:
            tags[tag] = None
    width, height = tags.get(WIDTH_TAG), tags.get(HEIGHT_TAG)
    if not width or not height:
        raise InvalidInput(f"{path}: the TIFF's first directory gives no image width and height")
    return TiffHeader(width, height, any(tag in tags for tag in GEOTIFF_TAGS))


def is_raster(path, output_format=None):
    """Whether ``path`` is predicted as a raster: ``output_format`` 'geotiff', or by default a TIFF that is
    georeferenced or larger than OpenCV decodes."""
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS:
            raise InvalidInput(f"--output_format must be one of {', '.join(OUTPUT_FORMATS)}, got '{output_format}'")
        return output_format == 'geotiff'
    if not path.lower().endswith(TIFF_SUFFIXES):
        return False
    header = read_tiff_header(path)
    return header is not None and (header.georeferenced or header.width * header.height > OPENCV_MAX_PIXELS)


@dataclasses.dataclass(frozen=True)
class RasterOptions:
    """How a raster's bands become the model's 8-bit BGR image, and what the output holds.

    ``bands``: 1-based band numbers taken as red, green, blue (one band: grey); by default 1 2 3, or 1 for a
    one-band raster. ``scale`` (min, max): values mapped linearly onto 0-255, the same for every band.
    ``percentile_stretch`` (low, high): each band's low and high percentiles (of a decimated read) mapped onto
    0-255. Without either, the raster must be 8-bit. ``confidence``: a second output band.
    """
    bands: tuple = None
    scale: tuple = None
    percentile_stretch: tuple = None
    confidence: bool = False

    def __post_init__(self):
        if self.bands is not None and (len(self.bands) not in (1, 3) or min(self.bands) < 1):
            raise InvalidInput(f"--bands takes 3 band numbers (red green blue) or 1 (grey), each from 1, "
                               f"got {' '.join(map(str, self.bands))}")
        if self.scale is not None and self.percentile_stretch is not None:
            raise InvalidInput("give --scale or --percentile_stretch, not both")
        if self.scale is not None and not self.scale[0] < self.scale[1]:
            raise InvalidInput(f"--scale MIN MAX needs MIN < MAX, got {self.scale[0]} {self.scale[1]}")
        if self.percentile_stretch is not None:
            low, high = self.percentile_stretch
            if not 0 <= low < high <= 100:
                raise InvalidInput(f"--percentile_stretch LOW HIGH needs 0 <= LOW < HIGH <= 100, got {low} {high}")


def import_rasterio():
    """rasterio, or one sentence naming the extra that brings it."""
    try:
        import rasterio
    except ImportError:
        raise Unsupported("reading and writing GeoTIFFs needs rasterio: pip install emanet-paddle[geo]") from None
    return rasterio


def output_path(save_dir, name):
    return os.path.join(save_dir, name + '.tif')


def predict_raster(segmenter, path, out_path, colors, options=RasterOptions()):
    """Write the labels of the raster ``path`` into the GeoTIFF ``out_path``, window by window, with
    ``segmenter``'s sliding window; ``colors``: the flat palette [r, g, b, ...] of the colour table."""
    rasterio = import_rasterio()
    if not segmenter.streams:
        raise InvalidInput(f"{path} is read window by window: give --is_slide --crop_size W H --stride W H "
                           "(without flips or scales, with transforms that act pixel by pixel)")
    partial = os.path.join(os.path.dirname(out_path) or '.', '.' + os.path.basename(out_path) + '.partial')
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
            _predict_raster(rasterio, segmenter, path, partial, colors, options)
        os.replace(partial, out_path)
        logger.info("Wrote %s: labels of %s window by window", out_path, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)  # only ever the partial file this call created


def _predict_raster(rasterio, segmenter, path, partial, colors, options):
    from rasterio.windows import Window
    source = _open(rasterio, path)
    with source:
        bands = _bands(source, path, options)
        low, high = _value_range(rasterio, source, path, bands, options)
        masked = _has_nodata(source)
        classes = segmenter.num_classes or _probe_classes(segmenter, source)
        dtype, nodata = ('uint8', 255) if classes <= 255 else ('uint16', 65535)

        def read_window(top, left, rows, columns):
            window = Window(left, top, columns, rows)
            with _reading(rasterio, path):
                if masked and not source.dataset_mask(window=window).any():
                    return None
                data = source.read(bands, window=window)  # [3, rows, columns]
            return _to_bgr(data, low, high)

        profile = dict(driver='GTiff', width=source.width, height=source.height, count=2 if options.confidence else 1,
                       dtype=dtype, nodata=nodata, crs=source.crs, transform=source.transform, tiled=True,
                       blockxsize=OUTPUT_BLOCK, blockysize=OUTPUT_BLOCK, compress='deflate', interleave='band',
                       BIGTIFF='IF_SAFER')
        with rasterio.open(partial, 'w', **profile) as output, _StripWriter(rasterio, path, output, masked,
                                                                            nodata) as writer:
            output.write_colormap(1, {index: tuple(colors[3 * index:3 * index + 3]) + (255,)
                                      for index in range(min(classes, len(colors) // 3))})
            output.set_band_description(1, 'class')
            if options.confidence:
                output.set_band_description(2, 'confidence (top class probability x 254)')
            strips = len(window_starts(source.height, segmenter.options.crop_size[1], segmenter.options.stride[1]))
            # Scores carried between rows of windows may spill next to the output (emanet.tiles.SPILL_BYTES).
            spill_dir = os.path.dirname(partial)
            for strip in tqdm(_stream(segmenter, read_window, source, options, spill_dir), total=strips,
                              desc=os.path.basename(path), unit='strip'):
                writer.write(*strip)


def _stream(segmenter, read_window, source, options, spill_dir):
    return stream_strips(read_window, source.height, source.width, segmenter.prepare_window, segmenter.forward,
                         segmenter.options.crop_size, segmenter.options.stride, segmenter.options.slide_batch,
                         confidence=options.confidence, spill_dir=spill_dir)


class _StripWriter:
    """Writes finished strips on a thread of its own, at most ``STRIPS_BEHIND`` waiting; nodata pixels of the
    input (read through a second handle: a GDAL dataset is used by one thread at a time) become ``nodata``."""

    def __init__(self, rasterio, path, output, masked, nodata):
        import concurrent.futures
        self.rasterio, self.path, self.output, self.masked, self.nodata = rasterio, path, output, masked, nodata
        self.executor = concurrent.futures.ThreadPoolExecutor(1, 'emanet-write')
        self.pending = []
        self.masks = None

    def __enter__(self):
        return self

    def write(self, top, labels, confidence):
        self.pending.append(self.executor.submit(self._write, top, labels, confidence))
        while len(self.pending) > STRIPS_BEHIND:
            self.pending.pop(0).result()

    def _write(self, top, labels, confidence):
        from rasterio.windows import Window
        window = Window(0, top, labels.shape[1], labels.shape[0])
        labels = labels.astype(self.output.dtypes[0], copy=False)
        if self.masked:
            if self.masks is None:
                self.masks = _open(self.rasterio, self.path)
            with _reading(self.rasterio, self.path):
                nodata = self.masks.dataset_mask(window=window) == 0
            labels[nodata] = self.nodata
            if confidence is not None:
                confidence[nodata] = self.nodata
        self.output.write(labels, 1, window=window)
        if confidence is not None:
            self.output.write(confidence.astype(self.output.dtypes[1], copy=False), 2, window=window)

    def __exit__(self, *exc_info):
        try:
            for future in self.pending:
                future.result()
        finally:
            self.executor.shutdown()
            if self.masks is not None:
                self.masks.close()


def _probe_classes(segmenter, source):
    """The class count of one window of zeros through the model (the output's type depends on it)."""
    crop_width, crop_height = segmenter.options.crop_size
    probe = np.zeros([min(crop_height, source.height), min(crop_width, source.width), 3], np.uint8)
    return _numpy(segmenter.forward(segmenter.prepare_window(probe)[None])).shape[1]


def _numpy(values):
    return np.asarray(values.numpy() if hasattr(values, 'numpy') else values)


class _reading:
    """GDAL's errors while reading ``path`` as one sentence naming it."""

    def __init__(self, rasterio, path):
        self.rasterio, self.path = rasterio, path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from rasterio._err import CPLE_BaseError
        if isinstance(error, (self.rasterio.errors.RasterioError, CPLE_BaseError)):
            # rasterio's read errors say "see previous exception": GDAL's own message is their cause.
            cause = error.__cause__ if isinstance(error.__cause__, CPLE_BaseError) else error
            reason = ' '.join(str(cause).split())
            raise InvalidInput(f"{self.path}: cannot read it as a raster ({reason})") from None
        return False


def _open(rasterio, path):
    with _reading(rasterio, path):
        return rasterio.open(path)


def _bands(source, path, options):
    bands = options.bands or ((1, 2, 3) if source.count >= 3 else (1,) if source.count == 1 else None)
    if bands is None:
        raise InvalidInput(f"{path} has {source.count} bands: say which to read with --bands R G B (or one band)")
    if max(bands) > source.count:
        raise InvalidInput(f"--bands {' '.join(map(str, bands))}: {path} has {source.count} bands")
    return list(bands) * 3 if len(bands) == 1 else list(bands)


def _has_nodata(source):
    from rasterio.enums import MaskFlags
    return any(flags != [MaskFlags.all_valid] for flags in source.mask_flag_enums)


def _value_range(rasterio, source, path, bands, options):
    """(low, high) per band [3], mapped onto 0 and 255; (None, None) for 8-bit data read as it is."""
    if options.scale is not None:
        return np.full([3], options.scale[0], np.float64), np.full([3], options.scale[1], np.float64)
    if options.percentile_stretch is None:
        if any(source.dtypes[band - 1] != 'uint8' for band in bands):
            raise InvalidInput(f"{path} holds {source.dtypes[bands[0] - 1]} values: say how they map onto 0-255 with "
                               "--scale MIN MAX or --percentile_stretch LOW HIGH")
        return None, None
    step = max(1, int(np.ceil(np.sqrt(source.width * source.height / STRETCH_SAMPLE_PIXELS))))
    out_shape = (len(bands), max(1, source.height // step), max(1, source.width // step))
    with _reading(rasterio, path):
        sample = source.read(bands, out_shape=out_shape, masked=True)  # nearest: overviews or every step-th pixel
    low, high = np.empty([3]), np.empty([3])
    for index, band in enumerate(sample):
        values = band.compressed()
        if values.size == 0:
            raise InvalidInput(f"{path}: every pixel of band {bands[index]} is nodata")
        low[index], high[index] = np.percentile(values, options.percentile_stretch)
        high[index] = max(high[index], low[index] + 1e-6)
    return low, high


def _to_bgr(data, low, high):
    """Bands [3, h, w] (red, green, blue) as a BGR uint8 image [h, w, 3], scaled from [low, high] to 0-255."""
    if low is not None:
        scaled = (data.astype(np.float32) - low[:, None, None].astype(np.float32)) * (
            255.0 / (high - low))[:, None, None].astype(np.float32)
        data = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(data[::-1].transpose(1, 2, 0))
