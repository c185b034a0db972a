"""What the EM unit attends to, as the paper's figures show it: for an image, the final
responsibilities z of every pixel to each of the K bases, the bases themselves, and pictures of both.

Works on any EMANet, this package's or PaddleSeg's own class (with weights of either): the input of
its EM unit is read by a forward pre-hook during one plain forward pass and the unit's EM iterations
(``emanet.models.ema_unit.em_iterations``) run again on it, so the model's outputs stay as they are.
"""
import contextlib
import dataclasses
import os

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from emanet.engine.predict import color_map, list_images, output_names
from emanet.errors import InvalidInput
from emanet.models.ema_unit import em_iterations
from emanet.segmenter import read_image, undo_transforms

# How many val images evaluation during training shows in VisualDL (``log_attention_pictures``).
LOGGED_IMAGES = 2


@dataclasses.dataclass
class EMAttention:
    """The EM unit's view of one image.

    Attributes:
        responsibilities: [K, h, w] float32 at the unit's feature resolution; sums to 1 over K.
        bases: [C, K] float32, the final bases (unit norm over C).
        labels: [H, W] int32, the model's segmentation of the image (one plain forward pass).
        image_maps: [K, H, W] float32, the responsibilities at the image's size and orientation.
    """
    responsibilities: np.ndarray
    bases: np.ndarray
    labels: np.ndarray
    image_maps: np.ndarray

    def strongest_base(self):
        """[H, W] int: the base each pixel of the image belongs to most."""
        return self.image_maps.argmax(axis=0)

    def pixel_shares(self):
        """[K]: the share of the image's pixels whose strongest base each base is."""
        return np.bincount(self.strongest_base().reshape(-1), minlength=len(self.image_maps)) / self.labels.size


def find_em_unit(model):
    """The model's EM attention unit: the sublayer with learned bases ``mu`` and a ``stage_num``."""
    units = [layer for layer in model.sublayers(include_self=True)
             if hasattr(layer, 'mu') and hasattr(layer, 'stage_num')]
    if not units:
        raise InvalidInput(f"{type(model).__name__} has no EM attention unit (a layer with bases 'mu' and 'stage_num')")
    return units[0]


@paddle.no_grad()
def em_attention(segmenter, image):
    """The EMAttention of ``image`` (a path or a BGR uint8 array [H, W, 3]) under ``segmenter``, an
    ``emanet.engine.inference.ModelSegmenter``: its model, and its transforms to prepare the image.

    The attention comes from a plain forward pass (no flips, scales or windows) in eval mode.
    """
    model = segmenter.model
    unit = find_em_unit(model)
    array, trans_info = segmenter.preprocess(image)
    captured = []
    hook = unit.register_forward_pre_hook(lambda layer, inputs: captured.append(inputs[0]))
    autocast = getattr(segmenter, 'autocast', None)  # a model trained with AMP O2 holds half-precision weights
    try:
        model.eval()
        with paddle.amp.auto_cast(**autocast) if autocast else contextlib.nullcontext():
            logits = model(paddle.to_tensor(array[None]))[0].astype('float32')  # [1, classes, h_in, w_in]
    finally:
        hook.remove()
    feats = captured[0].astype('float32')  # [1, C, h, w]
    height, width = feats.shape[2:]
    bases, resp = em_iterations(feats.flatten(2), unit.mu.astype('float32'), unit.stage_num)
    resp = resp.transpose([0, 2, 1]).reshape([1, -1, height, width])  # [1, K, h, w]
    # Bilinear, as the logits: the maps stay convex combinations, so they still sum to 1 over K.
    at_input = F.interpolate(resp, size=logits.shape[2:], mode='bilinear',
                             align_corners=getattr(model, 'align_corners', False))
    labels = paddle.argmax(undo_transforms(logits, trans_info), axis=1)[0]
    return EMAttention(responsibilities=resp[0].numpy(), bases=bases[0].numpy(),
                       labels=labels.numpy().astype(np.int32),
                       image_maps=undo_transforms(at_input, trans_info)[0].numpy())


def bgr_class_colors(palette=None):
    """[256, 3] BGR colours of the classes: the dataset's ``palette`` (RGB) if it has one, else PaddleSeg's."""
    return np.asarray(color_map(palette), np.uint8).reshape(-1, 3)[:, ::-1]


def base_colors(count):
    """``count`` distinct BGR colours: hues around the circle, alternating in brightness."""
    hues = (np.arange(count) * 180 / count).astype(np.uint8)
    values = np.where(np.arange(count) % 2 == 0, 255, 170).astype(np.uint8)
    hsv = np.stack([hues, np.full(count, 220, np.uint8), values], axis=1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0]


def attention_picture(image, attention, class_colors, top=10, tile_width=320, columns=4):
    """One BGR picture of ``attention`` over ``image`` (a path or BGR array), as a grid of tiles ``columns``
    wide: the image with its segmentation (``class_colors``: [classes, 3] BGR), each pixel's strongest
    base in its own colour, then the responsibility maps of the ``top`` bases that hold most pixels,
    each over the image (scaled to its own maximum) and labelled with its index and share of pixels."""
    image = read_image(image)
    height, width = image.shape[:2]
    tile_height = max(1, round(height * tile_width / width))
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    shares = attention.pixel_shares()
    tiles = [(_blend(image, np.asarray(class_colors, np.uint8)[attention.labels], 0.5), 'segmentation'),
             (_blend(gray, base_colors(len(shares))[attention.strongest_base()], 0.7), 'strongest base')]
    for base in np.argsort(-shares, kind='stable')[:top]:
        scaled = attention.image_maps[base] / max(float(attention.image_maps[base].max()), 1e-12)
        heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
        tiles.append((_blend(gray, heat, 0.6), f'base {base}: {shares[base]:.1%}'))
    tiles = [_labelled(cv2.resize(tile, (tile_width, tile_height), interpolation=cv2.INTER_AREA), text)
             for tile, text in tiles]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])


def _blend(image, overlay, weight):
    return cv2.addWeighted(overlay, weight, image, 1 - weight, 0)


def _labelled(tile, text):
    for color, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # white on a dark outline
        cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, thickness, cv2.LINE_AA)
    return tile


def save_attention_pictures(segmenter, image_path, save_dir, palette=None, top=10):
    """Write attention_picture of every image under ``image_path`` (an image, a folder or a list file)
    as save_dir/<name>_attention.png; return the paths written. ``palette``: the dataset's class colours."""
    paths, root = list_images(image_path)
    class_colors = bgr_class_colors(palette)
    written = []
    for path, name in tqdm(list(zip(paths, output_names(paths, root))), desc='visualize', unit='image'):
        image = read_image(path)  # once, for the model and the picture
        picture = attention_picture(image, em_attention(segmenter, image), class_colors, top=top)
        written.append(os.path.join(save_dir, name + '_attention.png'))
        os.makedirs(os.path.dirname(written[-1]), exist_ok=True)
        cv2.imwrite(written[-1], picture)
    return written


def log_attention_pictures(writer, segmenter, dataset, step, count=LOGGED_IMAGES):
    """Add attention_picture of the first ``count`` images of ``dataset`` to a VisualDL ``writer``
    as 'Attention/<image name>' at ``step``."""
    class_colors = bgr_class_colors(getattr(dataset, 'PALETTE', None))
    for image_path in [files[0] for files in dataset.file_list[:count]]:
        image = read_image(image_path)
        picture = attention_picture(image, em_attention(segmenter, image), class_colors)
        name = os.path.splitext(os.path.basename(image_path))[0]
        writer.add_image(tag=f'Attention/{name}', img=picture[:, :, ::-1], step=step)  # VisualDL takes RGB
