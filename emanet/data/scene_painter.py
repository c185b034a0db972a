"""Procedurally drawn street scenes in the Cityscapes folder layout: the quick-start dataset.

Each scene has a sky band above a varying horizon, a row of buildings with windows, a road in
perspective with lane marks, sidewalks at its sides, trees and bushes, cars and people scaled by
their distance to the horizon, and sometimes the ego vehicle's bonnet at the bottom (ignored, as in
Cityscapes). Colours overlap between classes (grey road, grey building, silver car) and every
region is textured, so a model has to use shape and context, not a per-pixel colour lookup.

The files are those of Cityscapes' ``gtFine`` release, so PaddleSeg's loader and the official
evaluator read them unchanged::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       official ids
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  train ids, 255 = ignore
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_instanceIds.png    uint16: the id, or for
                                                                               people and cars id * 1000 + n

Every image is drawn from its own ``RandomState`` seeded by (seed, split, index), so the files are
the same on every machine and whatever the number of worker processes.
"""
import json
import os
import shutil

import cv2
import numpy as np
from filelock import FileLock
from cityscapesscripts.helpers.labels import name2label

from emanet.data.cityscapes import ID_TO_TRAIN_ID
from emanet.data.files import convert_all
from emanet.errors import UserError
from emanet.untrusted import load_json

# The Cityscapes classes the scenes contain; the label maps keep the full 19-class trainId space.
SCENE_CLASSES = ('road', 'sidewalk', 'building', 'vegetation', 'sky', 'person', 'car')
SCENE_TRAIN_IDS = tuple(name2label[name].trainId for name in SCENE_CLASSES)

# A 10-minute run on 2 CPU cores sees at most about a thousand scenes, so with 500 the model meets
# each only once or twice and cannot memorise them; 100 validation scenes give a steady mIoU and
# are evaluated in seconds. All 600 are drawn in about 20 s on 2 busy cores (~25 ms a scene).
DEFAULT_NUM_TRAIN = 500
DEFAULT_NUM_VAL = 100
DEFAULT_SIZE = (256, 128)

# Bump when the drawing changes, so that existing folders are redrawn.
GENERATOR_VERSION = 1
MARKER_FILE = '.complete'
LOCK_FILE = '.lock'
CITIES = {'train': ('emaburg', 'pixelheim', 'rasterdam'), 'val': ('valbruck', 'testhausen')}
SPLIT_SEEDS = {'train': 0, 'val': 1}
# Cityscapes annotates the 20th frame of each 30-frame snippet.
ANNOTATED_FRAME = 19



BUILDING_COLOURS = ((150, 150, 150), (200, 190, 170), (150, 80, 60), (220, 220, 215), (110, 90, 80),
                    (180, 160, 120), (120, 130, 140))
PAVEMENT_COLOURS = ((160, 160, 155), (185, 170, 150), (170, 120, 110), (120, 115, 110))
FOLIAGE_COLOURS = ((60, 110, 40), (40, 80, 30), (90, 130, 50), (140, 125, 45), (70, 95, 60))
CAR_COLOURS = ((225, 225, 225), (30, 30, 35), (170, 170, 175), (110, 110, 115), (170, 30, 30),
               (40, 60, 150), (200, 170, 60))
SKIN_COLOURS = ((240, 200, 170), (200, 150, 110), (140, 95, 65), (90, 60, 40))


def make_street_scenes(root, num_train=DEFAULT_NUM_TRAIN, num_val=DEFAULT_NUM_VAL, size=DEFAULT_SIZE,
                       seed=0, workers=None):
    """Draw the street-scene dataset into ``root`` unless it is already there, and return ``root``.

    A marker file, written last, records the parameters: if it matches, nothing is redrawn; if it is
    missing (an interrupted run) or differs, this function's own city folders are deleted and drawn
    again. Other folders under ``root`` are never touched.

    Args:
        root (str): dataset folder, created if needed.
        num_train (int), num_val (int): number of scenes in the train and val splits.
        size (tuple): (width, height) of the images.
        seed (int): changes every scene.
        workers (int): processes drawing in parallel; default: the CPU count, at most 4.
    """
    root = str(root)
    width, height = size
    parameters = {'generator_version': GENERATOR_VERSION, 'num_train': num_train, 'num_val': num_val,
                  'size': [width, height], 'seed': seed}
    marker = os.path.join(root, MARKER_FILE)
    if _read_marker(marker) == parameters:
        return root
    os.makedirs(root, exist_ok=True)
    # Every rank of a data-parallel run builds the dataset: one draws, the others wait and reuse it.
    with FileLock(os.path.join(root, LOCK_FILE)):
        if _read_marker(marker) != parameters:
            _draw_all(root, marker, parameters, workers)
    return root


def _draw_all(root, marker, parameters, workers):
    """Delete this generator's city folders and the marker, draw every scene, then write the marker."""
    if os.path.exists(marker):
        os.remove(marker)
    for split, cities in CITIES.items():
        for folder in ('leftImg8bit', 'gtFine'):
            for city in cities:
                shutil.rmtree(os.path.join(root, folder, split, city), ignore_errors=True)

    size, seed = tuple(parameters['size']), parameters['seed']
    tasks = [(root, split, index, size, seed) for split in ('train', 'val')
             for index in range(parameters[f'num_{split}'])]
    convert_all(_write_scene, tasks, workers, 'drawing street scenes')

    with open(marker + '.part', 'w') as out:
        json.dump(parameters, out)
    os.replace(marker + '.part', marker)


def scene_stem(split, index):
    """The Cityscapes-style file stem ``<city>_<seq>_<frame>`` of scene ``index`` of ``split``."""
    cities = CITIES[split]
    return f'{cities[index % len(cities)]}_{index // len(cities):06d}_{ANNOTATED_FRAME:06d}'


def draw_street_scene(rng, size=DEFAULT_SIZE):
    """Draw one scene.

    Returns: the RGB image, uint8 [H, W, 3]; official label ids, uint8 [H, W]; instance ids, uint16 [H, W].
    """
    scene = _Scene(rng, *size)
    scene.draw_sky()
    scene.draw_buildings()
    scene.draw_ground()
    # Painter's algorithm: things further up the image are further away, so they are drawn first.
    things = scene.plan_trees() + scene.plan_bushes() + scene.plan_cars() + scene.plan_people()
    for _, draw in sorted(things, key=lambda thing: thing[0]):
        draw()
    if rng.rand() < 0.3:
        scene.draw_ego_bonnet()
    return scene.finish(), scene.ids, scene.instances


def _read_marker(path):
    try:
        return load_json(path, "a generated scene's marker")
    except UserError:
        return None


def _write_scene(task):
    root, split, index, size, seed = task
    rng = np.random.RandomState([seed, SPLIT_SEEDS[split], index])
    image, ids, instances = draw_street_scene(rng, size)

    stem = scene_stem(split, index)
    city = stem.split('_')[0]
    image_dir = os.path.join(root, 'leftImg8bit', split, city)
    label_dir = os.path.join(root, 'gtFine', split, city)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(label_dir, exist_ok=True)
    cv2.imwrite(os.path.join(image_dir, f'{stem}_leftImg8bit.png'), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(os.path.join(label_dir, f'{stem}_gtFine_labelIds.png'), ids)
    cv2.imwrite(os.path.join(label_dir, f'{stem}_gtFine_labelTrainIds.png'), ID_TO_TRAIN_ID[ids])
    cv2.imwrite(os.path.join(label_dir, f'{stem}_gtFine_instanceIds.png'), instances)
    return True  # written, for convert_all's count


class _Scene:
    """One image and its label maps, painted back to front.

    Sizes are fractions of the image size or of ``depth``, the distance of an object's foot below
    the horizon: in a pinhole view of a flat street an object's height in pixels grows linearly
    with it (the camera is about 1.2 m up, so a 1.7 m person is about 1.4 depths tall).
    """

    def __init__(self, rng, width, height):
        self.rng = rng
        self.width = width
        self.height = height
        self.image = np.zeros((height, width, 3), np.float32)
        self.ids = np.zeros((height, width), np.uint8)
        self.instances = np.zeros((height, width), np.uint16)
        self.instance_counts = {}
        # Textures take their grain from random windows of one noise field: fresh noise for each
        # of the ~25 painted regions of a scene would be most of its drawing time.
        self.grain = rng.standard_normal((2 * height, 2 * width)).astype(np.float32)
        self.horizon = int(height * rng.uniform(0.38, 0.55))
        self.vanishing_x = width * rng.uniform(0.35, 0.65)
        road_top_half_width = width * rng.uniform(0.01, 0.04)
        self.road_top = (self.vanishing_x - road_top_half_width, self.vanishing_x + road_top_half_width)
        self.road_bottom = (self.vanishing_x - width * rng.uniform(0.3, 0.6),
                            self.vanishing_x + width * rng.uniform(0.3, 0.6))

    # Painting primitives

    def blank(self):
        return np.zeros((self.height, self.width), np.uint8)

    def paint(self, mask, class_name, colour, grain=0.0, shading=0.0, blotch_size=None, instance=None):
        """Paint ``colour`` where ``mask`` is set, and label those pixels ``class_name``.

        Args:
            colour: an RGB colour, or a full-frame RGB image.
            grain (float): standard deviation of per-pixel brightness noise.
            shading (float): amplitude of smooth brightness blotches ``blotch_size`` pixels across
                (default: a quarter of the image height).
            instance (int): the instance id of a person or car, see ``new_instance``.
        """
        left, top, width, height = cv2.boundingRect(mask)
        if width == 0:  # out of view, or no lit windows
            return
        window = (slice(top, top + height), slice(left, left + width))
        pixels = np.asarray(colour, np.float32)
        pixels = pixels[window] if pixels.ndim == 3 else np.broadcast_to(pixels, (height, width, 3))
        if grain or shading:
            blotch_size = blotch_size or self.height / 4
            cells = (max(2, round(height / blotch_size)), max(2, round(width / blotch_size)))
            coarse = self.rng.uniform(-1, 1, cells)
            blotches = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
            row, column = self.rng.randint(self.height + 1), self.rng.randint(self.width + 1)
            noise = self.grain[row:row + height, column:column + width]
            pixels = pixels + (blotches * shading + noise * grain)[..., None]
        region = mask[window].astype(bool)
        self.image[window][region] = pixels[region]
        label = name2label[class_name]
        self.ids[window][region] = label.id
        self.instances[window][region] = label.id if instance is None else instance

    def new_instance(self, class_name):
        """The Cityscapes instance id of the next object of ``class_name``: label id * 1000 + its number."""
        number = self.instance_counts.get(class_name, 0)
        self.instance_counts[class_name] = number + 1
        return name2label[class_name].id * 1000 + number

    def jitter(self, colour, amount):
        return np.clip(np.asarray(colour, np.float32) + self.rng.uniform(-amount, amount, 3), 0, 255)

    def pick(self, colours, amount):
        """One of ``colours``, jittered by up to ``amount`` per channel."""
        return self.jitter(colours[self.rng.randint(len(colours))], amount)

    def road_edges(self, y):
        """x of the road's left and right edges at row ``y``."""
        t = (y - self.horizon) / (self.height - self.horizon)
        return tuple(top + (bottom - top) * t for top, bottom in zip(self.road_top, self.road_bottom))

    # Background

    def draw_sky(self):
        rng = self.rng
        if rng.rand() < 0.65:
            zenith, horizon = self.jitter((70, 130, 205), 25), self.jitter((185, 205, 230), 15)
        else:  # overcast
            zenith, horizon = self.jitter((150, 155, 165), 20), self.jitter((205, 205, 210), 15)
        rows = np.clip(np.arange(self.height, dtype=np.float32) / max(self.horizon, 1), 0, 1)[:, None, None]
        sky = zenith + (horizon - zenith) * rows + np.zeros((1, self.width, 1), np.float32)
        for _ in range(rng.randint(0, 4)):
            cloud = np.zeros((self.height, self.width), np.float32)
            centre = (int(rng.uniform(0, self.width)), int(rng.uniform(0, self.horizon * 0.7)))
            axes = (int(self.width * rng.uniform(0.08, 0.25)), int(self.height * rng.uniform(0.03, 0.08)))
            cv2.ellipse(cloud, centre, axes, 0, 0, 360, 1.0, -1)
            cloud = cv2.GaussianBlur(cloud, (0, 0), self.height * 0.03)[..., None] * rng.uniform(0.3, 0.7)
            sky = sky * (1 - cloud) + self.jitter((240, 240, 245), 10) * cloud
        self.paint(np.ones((self.height, self.width), np.uint8), 'sky', sky)

    def draw_buildings(self):
        rng = self.rng
        x = -self.width * rng.uniform(0, 0.1)
        while x < self.width:
            facade_width = self.width * rng.uniform(0.12, 0.35)
            if rng.rand() < 0.15:
                x += facade_width * 0.5  # a gap showing the sky
                continue
            top = self.horizon - self.height * rng.uniform(0.12, 0.5)
            facade = self.blank()
            cv2.rectangle(facade, (int(x), int(top)), (int(x + facade_width), self.horizon), 1, -1)
            self.paint(facade, 'building', self.pick(BUILDING_COLOURS, 20), grain=4, shading=10)
            self.draw_windows(x, top, facade_width)
            x += facade_width

    def draw_windows(self, left, top, facade_width):
        rng = self.rng
        cell_width = self.width * rng.uniform(0.04, 0.07)
        cell_height = self.height * rng.uniform(0.07, 0.12)
        window_width, window_height = cell_width * rng.uniform(0.4, 0.7), cell_height * rng.uniform(0.4, 0.7)
        dark, lit = self.blank(), self.blank()
        y = top + cell_height * 0.5
        while y + cell_height < self.horizon:  # the ground floor has none
            x = left + (cell_width - window_width) / 2
            while x + window_width < left + facade_width:
                panes = lit if rng.rand() < 0.15 else dark
                cv2.rectangle(panes, (int(x), int(y)), (int(x + window_width), int(y + window_height)), 1, -1)
                x += cell_width
            y += cell_height
        self.paint(dark, 'building', self.jitter((55, 65, 85), 25), grain=4, shading=12, blotch_size=3)
        self.paint(lit, 'building', self.jitter((215, 200, 130), 20), grain=4)

    def draw_ground(self):
        height, width, horizon = self.height, self.width, self.horizon
        ground = self.blank()
        ground[horizon:] = 1
        self.paint(ground, 'sidewalk', self.pick(PAVEMENT_COLOURS, 15), grain=5, shading=8)
        joints = self.blank()
        for step in np.linspace(0, 1, self.rng.randint(5, 10))[1:]:
            y = int(horizon + (height - horizon) * step ** 2)  # paving joints spread out towards the camera
            cv2.line(joints, (0, y), (width, y), 1, 1)
        self.paint(joints, 'sidewalk', self.jitter((90, 90, 90), 15), grain=5)

        road = self.blank()
        corners = [(self.road_top[0], horizon), (self.road_top[1], horizon),
                   (self.road_bottom[1], height), (self.road_bottom[0], height)]
        cv2.fillPoly(road, [np.int32(corners)], 1)
        self.paint(road, 'road', self.jitter((85, 85, 90), 25), grain=7, shading=12, blotch_size=height / 8)
        self.draw_lane_marks()

        curbs = self.blank()
        curb_width = max(1.0, height * 0.025)
        for top_x, bottom_x, outward in ((self.road_top[0], self.road_bottom[0], -1),
                                         (self.road_top[1], self.road_bottom[1], 1)):
            strip = [(top_x, horizon), (top_x + outward, horizon),
                     (bottom_x + outward * curb_width * 2, height), (bottom_x, height)]
            cv2.fillPoly(curbs, [np.int32(strip)], 1)
        self.paint(curbs, 'sidewalk', self.jitter((175, 175, 170), 20), grain=5, shading=5)

    def draw_lane_marks(self):
        rng = self.rng
        colour = self.jitter((235, 230, 215), 15) if rng.rand() < 0.7 else self.jitter((220, 190, 60), 15)
        centre_offset = rng.uniform(-0.15, 0.15)
        marks = self.blank()
        dash_start = rng.uniform(0.03, 0.08)
        while dash_start < 1:
            dash_end = min(1.0, dash_start * 1.5)
            quad = []
            for t, side in ((dash_start, -1), (dash_start, 1), (dash_end, 1), (dash_end, -1)):
                y = self.horizon + (self.height - self.horizon) * t
                left, right = self.road_edges(y)
                centre = (left + right) / 2 + (right - left) * centre_offset
                quad.append((centre + side * (right - left) * 0.012, y))
            cv2.fillPoly(marks, [np.int32(quad)], 1)
            dash_start *= 2.2  # dashes equally spaced on the street are further apart near the camera
        self.paint(marks, 'road', colour, grain=6)

    # Things: each plan_* returns [(foot row, draw function)] so that all are drawn far to near.

    def foot_row(self, near, far):
        """A random row between ``near`` and ``far`` fractions of the way from the horizon to the bottom."""
        return self.horizon + (self.height - self.horizon) * self.rng.uniform(near, far)

    def sidewalk_x(self, y, margin):
        """A random x on a sidewalk at row ``y``, ``margin`` or more from the road; None if none is in view."""
        left, right = self.road_edges(y)
        sides = []
        if left - margin > 0:
            sides.append((max(-margin, left - 0.35 * self.width), left - margin))
        if right + margin < self.width:
            sides.append((right + margin, min(self.width + margin, right + 0.35 * self.width)))
        if not sides:
            return None
        low, high = sides[self.rng.randint(len(sides))]
        return self.rng.uniform(low, high)

    def plan_trees(self):
        plans = []
        for _ in range(self.rng.randint(1, 4)):
            y = self.foot_row(0.05, 0.6)
            x = self.sidewalk_x(y, margin=self.width * 0.02)
            if x is not None:
                plans.append((y, lambda x=x, y=y: self.draw_tree(x, y)))
        return plans

    def draw_tree(self, x, y):
        rng = self.rng
        depth = y - self.horizon
        tree_height = depth * rng.uniform(2.5, 4.5)
        trunk = self.blank()
        trunk_half_width = max(1.0, depth * 0.06)
        cv2.rectangle(trunk, (int(x - trunk_half_width), int(y - tree_height * 0.55)),
                      (int(x + trunk_half_width), int(y)), 1, -1)
        self.paint(trunk, 'vegetation', self.jitter((80, 60, 45), 15), grain=6, shading=8)
        self.draw_foliage(x, y - tree_height * 0.7, tree_height * 0.25, tree_height * 0.25)

    def draw_foliage(self, x, y, spread_x, spread_y):
        """A crown of overlapping leafy blobs around (x, y)."""
        rng = self.rng
        crown = self.blank()
        for _ in range(rng.randint(4, 9)):
            centre = (int(x + rng.uniform(-1, 1) * spread_x), int(y + rng.uniform(-1, 1) * spread_y * 0.6))
            axes = (max(1, int(spread_x * rng.uniform(0.5, 0.9))),
                    max(1, int(spread_y * rng.uniform(0.4, 0.8))))
            cv2.ellipse(crown, centre, axes, 0, 0, 360, 1, -1)
        self.paint(crown, 'vegetation', self.pick(FOLIAGE_COLOURS, 15), grain=14, shading=25,
                   blotch_size=self.height * 0.05)

    def plan_bushes(self):
        plans = []
        for _ in range(self.rng.randint(0, 3)):
            y = self.foot_row(0.02, 0.4)
            x = self.sidewalk_x(y, margin=self.width * 0.03)
            if x is not None:
                depth = y - self.horizon
                spread = depth * self.rng.uniform(0.6, 1.2)
                plans.append((y, lambda x=x, y=y, depth=depth, spread=spread:
                              self.draw_foliage(x, y - depth * 0.3, spread, depth * 0.4)))
        return plans

    def plan_cars(self):
        plans = []
        for _ in range(self.rng.randint(1, 5)):
            y = self.foot_row(0.15, 0.85)
            x = self.rng.uniform(*self.road_edges(y))
            plans.append((y, lambda x=x, y=y: self.draw_car(x, y)))
        return plans

    def draw_car(self, centre_x, bottom):
        rng = self.rng
        depth = bottom - self.horizon
        car_height = depth * rng.uniform(1.0, 1.3)
        car_width = depth * rng.uniform(1.3, 2.8)  # seen from behind up to seen from the side
        left, right = centre_x - car_width / 2, centre_x + car_width / 2
        instance = self.new_instance('car')

        shadow = self.blank()
        cv2.ellipse(shadow, (int(centre_x), int(bottom)), (int(car_width * 0.6), max(1, int(depth * 0.08))),
                    0, 0, 360, 1, -1)
        self.image[shadow.astype(bool)] *= 0.6  # darkens the road; its label stays

        body = self.blank()
        sill, waist, roof = bottom - car_height * 0.14, bottom - car_height * 0.6, bottom - car_height
        _fill_rounded_rectangle(body, left, waist, right, sill, radius=car_height * 0.15)
        cabin = [(left + car_width * rng.uniform(0.08, 0.15), waist),
                 (left + car_width * rng.uniform(0.2, 0.3), roof),
                 (right - car_width * rng.uniform(0.2, 0.3), roof),
                 (right - car_width * rng.uniform(0.08, 0.15), waist)]
        cv2.fillPoly(body, [np.int32(cabin)], 1)
        colour = self.pick(CAR_COLOURS, 15) if rng.rand() < 0.8 else rng.uniform(0, 255, 3)
        self.paint(body, 'car', colour, grain=3, shading=20, blotch_size=car_height / 3, instance=instance)

        window = self.blank()
        centre = np.mean(cabin, axis=0)
        cv2.fillPoly(window, [np.int32([centre + (np.array(corner) - centre) * 0.75 for corner in cabin])], 1)
        self.paint(window, 'car', self.jitter((50, 60, 75), 15), grain=4, shading=15, instance=instance)

        lights = self.blank()
        light_size = max(1.0, car_height * 0.08)
        for x in (left + car_width * 0.04, right - car_width * 0.04 - light_size * 1.5):
            cv2.rectangle(lights, (int(x), int(waist + light_size)),
                          (int(x + light_size * 1.5), int(waist + light_size * 2)), 1, -1)
        rear_lights = rng.rand() < 0.6
        light_colour = self.jitter((200, 40, 30), 20) if rear_lights else self.jitter((235, 225, 190), 15)
        self.paint(lights, 'car', light_colour, instance=instance)

        wheels = self.blank()
        wheel_radius = max(1, int(min(car_height * 0.16, car_width * 0.12)))
        for x in (left + car_width * 0.18, right - car_width * 0.18):
            cv2.circle(wheels, (int(x), int(bottom - wheel_radius)), wheel_radius, 1, -1)
        self.paint(wheels, 'car', self.jitter((35, 35, 38), 8), grain=4, shading=5, instance=instance)

    def plan_people(self):
        plans = []
        for _ in range(self.rng.randint(1, 6)):
            y = self.foot_row(0.2, 0.9)
            x = self.sidewalk_x(y, margin=0) if self.rng.rand() < 0.75 else None
            if x is None:  # crossing the road
                x = self.rng.uniform(*self.road_edges(y))
            plans.append((y, lambda x=x, y=y: self.draw_person(x, y)))
        return plans

    def draw_person(self, centre_x, bottom):
        rng = self.rng
        person_height = (bottom - self.horizon) * rng.uniform(1.2, 1.5)
        half_width = person_height * rng.uniform(0.12, 0.17)
        instance = self.new_instance('person')
        top = bottom - person_height
        hip = bottom - person_height * 0.47
        shoulder = top + person_height * 0.18

        legs = self.blank()
        stride = half_width * rng.uniform(-0.8, 0.8)
        leg_width = half_width * 0.45
        for hip_x, foot_x in ((centre_x - half_width * 0.5, centre_x - half_width * 0.4 - stride),
                              (centre_x + half_width * 0.5, centre_x + half_width * 0.4 + stride)):
            leg = [(hip_x - leg_width, hip), (hip_x + leg_width, hip),
                   (foot_x + leg_width, bottom), (foot_x - leg_width, bottom)]
            cv2.fillPoly(legs, [np.int32(leg)], 1)
        trousers = self.jitter((45, 50, 70), 30) if rng.rand() < 0.7 else rng.uniform(0, 255, 3)
        self.paint(legs, 'person', trousers, grain=6, shading=10, instance=instance)

        upper_body = self.blank()
        _fill_rounded_rectangle(upper_body, centre_x - half_width, shoulder, centre_x + half_width,
                                hip + person_height * 0.04, radius=half_width * 0.4)
        arm_width = max(1, int(half_width * 0.35))
        for side in (-1, 1):
            swing = side * half_width * rng.uniform(0, 0.6)
            cv2.line(upper_body, (int(centre_x + side * half_width), int(shoulder + arm_width)),
                     (int(centre_x + side * half_width * 1.2 + swing), int(hip)), 1, arm_width)
        self.paint(upper_body, 'person', rng.uniform(0, 255, 3), grain=6, shading=15, instance=instance)

        head = self.blank()
        head_radius = max(1, int(person_height * 0.085))
        head_centre = (int(centre_x), int(top + head_radius))
        cv2.circle(head, head_centre, head_radius, 1, -1)
        self.paint(head, 'person', self.pick(SKIN_COLOURS, 15), grain=3, instance=instance)
        hair = self.blank()
        cv2.ellipse(hair, head_centre, (head_radius, head_radius), 0, 180, 360, 1, -1)
        self.paint(hair, 'person', self.jitter((50, 35, 25), 30), grain=3, instance=instance)

    def draw_ego_bonnet(self):
        """The front of the recording car, labelled 'ego vehicle' (ignored in training and evaluation)."""
        rng = self.rng
        bonnet_height = self.height * rng.uniform(0.05, 0.1)
        bonnet = self.blank()
        centre = (int(self.width * rng.uniform(0.45, 0.55)), int(self.height + bonnet_height * 2))
        cv2.ellipse(bonnet, centre, (int(self.width * 0.8), int(bonnet_height * 3)), 0, 0, 360, 1, -1)
        self.paint(bonnet, 'ego vehicle', self.jitter((40, 40, 45), 15), grain=3, shading=20)

    # Camera

    def finish(self):
        """Camera effects: contrast, brightness and white-balance jitter, slight blur and sensor noise."""
        rng = self.rng
        image = self.image
        mean = image.mean()
        image = (image - mean) * rng.uniform(0.8, 1.2) + mean
        image = image * rng.uniform(0.8, 1.2) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.0))
        image = image + self.grain[:self.height, :self.width, None] * rng.uniform(2, 6)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _fill_rounded_rectangle(mask, left, top, right, bottom, radius):
    radius = int(max(0, min(radius, (right - left) / 2, (bottom - top) / 2)))
    left, top, right, bottom = int(left), int(top), int(right), int(bottom)
    cv2.rectangle(mask, (left + radius, top), (right - radius, bottom), 1, -1)
    cv2.rectangle(mask, (left, top + radius), (right, bottom - radius), 1, -1)
    for x, y in ((left + radius, top + radius), (right - radius, top + radius),
                 (left + radius, bottom - radius), (right - radius, bottom - radius)):
        cv2.circle(mask, (x, y), radius, 1, -1)
