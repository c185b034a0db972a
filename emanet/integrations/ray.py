"""tools/infer.py beyond one machine: an exported model labels a folder, a list file or any path pyarrow's
filesystems read (``s3://``, ``gs://``, ``hdfs://``, ``file://``) on a Ray cluster, losing no image when a node dies.

    from emanet.integrations import ray as emanet_ray
    emanet_ray.infer_on_ray('output/export', 's3://bucket/images', '/shared/result', address='auto')

The driver lists the images and leaves out those whose results are all present, so a rerun does only the rest.
A pool of actors, each holding the exported model with its own share of the cores (``cpu_threads``), reads
and decodes each image, labels it and writes its mask and overlay under the names tools/infer.py gives them
(``emanet.engine.predict``). Each actor takes ``CALLS_PER_ACTOR`` images at once on threads of its own: one is
read, decoded or written while another is in the model, which runs on one thread at a time. Reading in Ray tasks
beside the actors cost a Python process per image: Ray ends idle workers beyond one per CPU, and the actors hold
every CPU, so each task started a fresh worker that imported Paddle (two nodes of one CPU ran at 0.50x one).
Each file is written whole or not at all (a temporary file renamed over it), so an image that Ray runs again
rewrites the same files and a file present is complete.
Every node must see the exported folder and the save folder at the same path (a shared filesystem).

A node that dies: its actors are not restarted (``max_restarts=0``, Ray Data's default being -1 with
``max_task_retries=-1``): an actor whose node is gone can start again only where its CPUs are free, and on a
cluster that no autoscaler grows its tasks would wait forever. So the actor's death ends the round
(``ActorUnavailableError``); the driver waits for the cluster to mark the node dead and runs the images whose
results are missing again, on the CPUs free, as long as rounds still write something new.

Nothing here imports Ray until a function is called; ``pip install 'emanet-paddle[ray]'`` installs it.
"""
import collections
import dataclasses
import gc
import os
import posixpath
import re
import time
import uuid

import cv2
import numpy as np

from emanet.engine.predict import (IMAGE_SUFFIXES, color_map, list_images, output_names, pseudo_color_paths,
                                   save_pseudo_color)
from emanet.errors import InvalidInput, Unsupported
from emanet.logger import logger

INSTALL_HINT = "pip install 'emanet-paddle[ray]'"
# CPUs an actor asks for at least, when the cluster has (almost) none free; every actor leaves this much of its
# share unasked. An actor of a round that a lost node ended is let go only once Ray Data's last references to it
# are collected, and until then the next round's actors must fit beside it.
MIN_SHARE = 0.1
# Images an actor holds at once, each on a thread: one in the model, the other read, decoded or written meanwhile.
CALLS_PER_ACTOR = 2
MAX_BLOCKS = 4096  # one image per block (the finest balance over the actors) up to this many images
PROGRESS_SECONDS = 10.0
# Ray Data feeds the pool once all its actors have started, so that every node takes its share from the first image;
# a pool the cluster cannot place fails after this long rather than waiting forever.
ACTOR_START_SECONDS = 600
# After an actor was lost, how long to wait for the cluster to mark its node dead (Ray's health checks take about
# 15 s), so that the next round does not place an actor on it again.
NODE_DEATH_SECONDS = 60
ROUNDS_WITHOUT_PROGRESS = 3  # rounds in a row that lost actors and wrote nothing, before the run gives up


@dataclasses.dataclass
class RayReport:
    """What a run did: images labelled (per node), left out because their results were present, failed."""
    done: int = 0
    skipped: int = 0
    seconds: float = 0.0
    per_node: dict = dataclasses.field(default_factory=collections.Counter)  # images each node labelled
    failed: list = dataclasses.field(default_factory=list)  # (path, reason), in the order they came back
    startup_seconds: float = 0.0  # until the first image came back (connecting, actors loading the model)
    actors: int = 0  # in the last round
    actor_cpus: float = 0.0  # what each of them asks of a node
    rounds: int = 0  # one, and one more after each round that a lost node ended


def require_ray():
    """The ``ray`` module with Ray Data, or one sentence naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray without its data extra lacks pyarrow and pandas)
    except ImportError:
        raise Unsupported(f"inference on Ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


def list_inputs(image_path):
    """(paths, root) as ``emanet.engine.predict.list_images`` gives them, for a local path or a URI
    (a folder searched recursively, one image, or a list file whose first column is relative to its folder)."""
    if '://' not in image_path:
        return list_images(image_path)
    import pyarrow.fs
    scheme = image_path.split('://', 1)[0]
    filesystem, inner = pyarrow.fs.FileSystem.from_uri(image_path)
    info = filesystem.get_file_info(inner)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"image path not found: {image_path}")
    if info.type == pyarrow.fs.FileType.Directory:
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
        paths = sorted(f"{scheme}://{entry.path}" for entry in found
                       if entry.type == pyarrow.fs.FileType.File and entry.path.lower().endswith(IMAGE_SUFFIXES))
        root = image_path.rstrip('/')
    elif image_path.lower().endswith(IMAGE_SUFFIXES):
        paths, root = [image_path], posixpath.dirname(image_path)
    else:
        root = posixpath.dirname(image_path)
        lines = _read_bytes(image_path).decode('utf-8').splitlines()
        paths = [posixpath.join(root, line.split()[0]) for line in lines if line.strip()]
    if not paths:
        raise FileNotFoundError(f"no images found in {image_path}")
    return paths, root


def results_present(save_dir, name):
    """Whether every file of the image named ``name`` is in ``save_dir`` (written atomically: present is complete)."""
    return all(os.path.exists(path) for path in pseudo_color_paths(save_dir, name))


def infer_on_ray(deploy_path, image_path, save_dir, address=None, actors=None, backend=None, precision='fp32',
                 cpu_threads=None, options=None, fail_fast=False, progress_seconds=PROGRESS_SECONDS):
    """Label every image under ``image_path`` whose results are not yet in ``save_dir``, on the Ray cluster at
    ``address`` (None: as ``ray.init()`` finds or starts one; 'auto', 'ray://host:port' or 'host:port'); return a
    ``RayReport``. The outputs are tools/infer.py's: save_dir/pseudo_color_prediction/<name>.png and
    save_dir/added_prediction/<name>.jpg.

    ``actors`` exported models run at once (default: one per CPU of the cluster), each with ``cpu_threads`` math
    threads (default: the cluster's CPUs shared among them). An image that fails (a file that is no image) is
    listed in the report and the others go on; with ``fail_fast`` the first one stops the run (``InvalidInput``).
    """
    ray = require_ray()
    paths, root = list_inputs(image_path)
    names = output_names(paths, root)
    todo = [(path, name) for path, name in zip(paths, names) if not results_present(save_dir, name)]
    report = RayReport(skipped=len(paths) - len(todo))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, logging_level='warning')
    data_context = ray.data.DataContext.get_current()
    settings = {'enable_progress_bars': False,  # the run logs its own progress, per node
                'wait_for_min_actors_s': ACTOR_START_SECONDS}
    settings_before = {key: getattr(data_context, key) for key in settings}
    for key, value in settings.items():
        setattr(data_context, key, value)
    lost_node_errors = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
                        ray.exceptions.WorkerCrashedError)
    temp_tag = f"ray{uuid.uuid4().hex[:8]}"
    progress = _Progress(report, len(todo), progress_seconds)
    try:
        remaining, rounds_without_progress = todo, 0
        while remaining:
            report.rounds += 1
            nodes_at_start, lost = set(_alive_node_cpus(ray)), None
            try:
                _run_round(ray, remaining, report, progress, deploy_path, save_dir, actors, backend, precision,
                           cpu_threads, options, fail_fast, temp_tag)
            except lost_node_errors as error:
                lost = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            except ray.exceptions.GetTimeoutError:
                raise Unsupported(f"the Ray cluster did not start {report.actors} actors of {report.actor_cpus} CPUs "
                                  f"each in {ACTOR_START_SECONDS} s; ask for fewer with --ray_actors") from None
            if lost:
                logger.warning("[RAY] %s", lost)
                # The aborted round's dataset, held by the exception's frames, keeps its actors and their CPUs
                # until it is collected: the next round's pool could not start beside them.
                gc.collect()
                _wait_for_the_lost_node(ray, nodes_at_start)
            failed = {path for path, _ in report.failed}
            still_missing = [(path, name) for path, name in remaining
                             if path not in failed and not results_present(save_dir, name)]
            rounds_without_progress = rounds_without_progress + 1 if len(still_missing) == len(remaining) else 0
            if rounds_without_progress >= ROUNDS_WITHOUT_PROGRESS:
                raise Unsupported(f"{ROUNDS_WITHOUT_PROGRESS} runs on the Ray cluster in a row lost actors and wrote "
                                  f"nothing; {len(remaining)} images are missing (see the warnings above); run again "
                                  f"to resume")
            if still_missing:
                logger.warning("[RAY] %d images still missing after a node was lost: running them again on the "
                               "nodes alive", len(still_missing))
            remaining = still_missing
    finally:
        for key, value in settings_before.items():
            setattr(data_context, key, value)
        _remove_temporary_files(save_dir, [name for _, name in todo], temp_tag)
        if started_here:
            ray.shutdown()
    # Counted from the files: an image written just before its actor died came back in no row.
    report.done = sum(results_present(save_dir, name) for _, name in todo)
    report.seconds = time.perf_counter() - progress.start
    logger.info("[RAY] Predicted %d images in %.1f s (%.2f images/s; the first after %.1f s) with %d actors on %d nodes "
                "(%s); %d skipped (results present); %d failed%s", report.done, report.seconds,
                report.done / max(report.seconds, 1e-9), report.startup_seconds, report.actors, len(report.per_node),
                _per_node(report.per_node), report.skipped, len(report.failed),
                ''.join(f"\n  {path}: {reason}" for path, reason in report.failed))
    return report


def _run_round(ray, todo, report, progress, deploy_path, save_dir, actors, backend, precision, cpu_threads,
               options, fail_fast, temp_tag):
    node_cpus = _alive_node_cpus(ray)
    # Sized by the CPUs free: other jobs may hold some, and so may an actor of an aborted round until Ray Data's
    # shutdown lets it go.
    free_cpus = min(sum(node_cpus.values()), ray.available_resources().get('CPU', 0))
    actors = actors or max(1, int(free_cpus))
    threads = cpu_threads or max(1, min(int(free_cpus // actors), int(max(node_cpus.values()))))
    share = min(threads, max(free_cpus, MIN_SHARE) / actors)
    report.actors, report.actor_cpus = actors, max(share - MIN_SHARE, MIN_SHARE)
    rows = [{'path': path, 'name': name} for path, name in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    dataset = dataset.map(
        _Labeler, compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                                     enable_true_multi_threading=True),
        num_cpus=report.actor_cpus,
        fn_constructor_kwargs={'deploy_path': os.path.abspath(deploy_path), 'backend': backend,
                               'precision': precision, 'cpu_threads': threads, 'options': options,
                               'save_dir': os.path.abspath(save_dir), 'temp_tag': temp_tag},
        max_restarts=0)
    for row in dataset.iter_rows():
        if row['error']:
            if fail_fast:
                raise InvalidInput(f"{row['path']}: {row['error']} (--fail_fast stops at the first image that fails)")
            report.failed.append((row['path'], row['error']))
        else:
            report.per_node[row['node']] += 1
        progress.update()


class _Progress:
    """A log line every ``seconds``: images done of the run's, images/s, and per node."""

    def __init__(self, report, total, seconds):
        self.report, self.total, self.seconds = report, total, seconds
        self.start = self.last = time.perf_counter()

    def update(self):
        now = time.perf_counter()
        if not self.report.startup_seconds:
            self.report.startup_seconds = now - self.start
        if now - self.last < self.seconds:
            return
        self.last = now
        done = sum(self.report.per_node.values())
        logger.info("[RAY] %d/%d images, %.2f images/s (%s)", done + len(self.report.failed), self.total,
                    done / (now - self.start), _per_node(self.report.per_node))


def _wait_for_the_lost_node(ray, nodes_at_start):
    """Wait (at most NODE_DEATH_SECONDS) until a node of the round is no longer alive in the cluster's view."""
    deadline = time.monotonic() + NODE_DEATH_SECONDS
    while set(_alive_node_cpus(ray)) >= nodes_at_start and time.monotonic() < deadline:
        time.sleep(0.5)


def _per_node(per_node):
    return ', '.join(f"node {node}: {count}" for node, count in sorted(per_node.items())) or 'no node'


def _alive_node_cpus(ray):
    """{node id: CPUs} of the nodes alive that have CPUs."""
    return {node['NodeID']: node['Resources'].get('CPU', 0) for node in ray.nodes()
            if node['Alive'] and node['Resources'].get('CPU', 0) > 0}


def _read_bytes(path):
    if '://' in path:
        import pyarrow.fs
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            return stream.read()
    with open(path, 'rb') as f:
        return f.read()


def _read_image(path):
    """The image at ``path``, BGR uint8 as cv2.imread reads it."""
    image = cv2.imdecode(np.frombuffer(_read_bytes(path), np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InvalidInput("not an image OpenCV can decode")
    return image


class _Labeler:
    """A Ray Data actor: one exported model labelling images and writing their results. Ray calls it on up to
    ``CALLS_PER_ACTOR`` threads at once; the model runs on a thread of its own, one image at a time (a predictor
    is not for concurrent calls, and Paddle's oneDNN caches are kept per thread)."""

    def __init__(self, deploy_path, backend, precision, cpu_threads, options, save_dir, temp_tag):
        import concurrent.futures

        import ray
        from emanet.deploy.backends import load_exported
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, 'emanet-model')
        self.segmenter = self.model_thread.submit(
            load_exported, deploy_path, backend=backend, precision=precision, cpu_threads=cpu_threads,
            options=options).result()
        self.colors = color_map(self.segmenter.deploy.get('palette'))  # the export's colours, as tools/infer.py
        self.save_dir, self.temp_tag = save_dir, temp_tag
        self.node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def __call__(self, row):
        result = {'path': row['path'], 'name': row['name'], 'node': self.node, 'error': ''}
        try:
            image, model_input, trans_info = self.segmenter.prepare(_read_image(row['path']))
            label = self.model_thread.submit(self.segmenter.predict_prepared, (image, model_input, trans_info)).result()
            save_pseudo_color(image, label.astype(np.uint8, copy=False), self.save_dir, row['name'], self.colors,
                              self.temp_tag)
        except Exception as error:  # one image's failure (a file that is no image) is reported by its name
            result['error'] = f"{type(error).__name__}: {error}"
        return result


def _remove_temporary_files(save_dir, names, temp_tag):
    """Delete the temporary files this run's writers left when they were killed: only beside the results of this
    run's images (``names``), only under the names ``write_atomically`` gives them, ``<result>.<temp_tag>-<8 hex
    digits>.tmp``, with the ``temp_tag`` this run made."""
    results = collections.defaultdict(set)  # folder: the result files of this run's images in it
    for name in names:
        for path in pseudo_color_paths(save_dir, name):
            results[os.path.dirname(path)].add(os.path.basename(path))
    for folder, files in results.items():
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            result, mark, rest = entry.partition(f".{temp_tag}-")
            if mark and result in files and re.fullmatch(r'[0-9a-f]{8}\.tmp', rest):
                os.remove(os.path.join(folder, entry))
