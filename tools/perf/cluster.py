"""tools/infer.py --ray on a local Ray cluster: ``LocalCluster`` (nodes of one CPU on 127.0.0.1, each a ``ray start
--block`` in a process group of its own, so that one node can be killed and every node stopped by its group, and
each confined to a core of its own, as a machine of one CPU would be), and
``ray_scaling``, images/s on one node against two, and against tools/infer.py's loop on the same CPUs."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from emanet.deploy.backends import load_exported
from emanet.engine.predict import predict_images
from emanet.logger import logger

WAIT_SECONDS = 90  # bound of every wait on the cluster: a stuck cluster is an error, not a hang
# argv: a core, then a command to run on that core alone.
CONFINED_EXEC = 'import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execv(sys.argv[2], sys.argv[2:])'


class LocalCluster:
    """Ray nodes of one CPU each on 127.0.0.1: ``add_node()`` starts the head, then nodes that join it. Node i and
    every process it starts (raylet, workers, actors) run on the i-th core this process may use (round robin when
    there are more nodes than cores): ``--num-cpus 1`` only counts, so an unconfined node of one CPU would use
    every idle core for its actor's reading and writing threads and for Ray's own processes."""

    def __init__(self, temp_dir, pythonpath=None):
        import ray
        self.ray = ray
        self.temp_dir = temp_dir
        self.port = _free_port()
        self.address = f'127.0.0.1:{self.port}'
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0',
                        PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, os.environ.get('PYTHONPATH')])))
        self.processes = []
        self.node_ids = []

    def add_node(self):
        """Start a node (the first is the head) and wait until the cluster counts it; return its node id."""
        from emanet.integrations.ray import _alive_node_cpus
        index = len(self.processes)
        args = (['--head', '--port', str(self.port), '--include-dashboard', 'false', '--temp-dir', self.temp_dir]
                if index == 0 else ['--address', self.address])
        ray_command = os.path.join(os.path.dirname(sys.executable), 'ray')
        cores = sorted(os.sched_getaffinity(0))
        core = cores[index % len(cores)]
        with open(os.path.join(self.temp_dir, f'node{index}.log'), 'wb') as log:
            # Confined by a Python of its own that then becomes `ray start` (exec keeps the process and its
            # affinity): a preexec_fn is not safe in a process that runs threads, as Paddle's.
            process = subprocess.Popen(
                [sys.executable, '-c', CONFINED_EXEC, str(core), ray_command, 'start', '--block', '--num-cpus', '1',
                 '--node-ip-address', '127.0.0.1', '--object-store-memory', str(200 << 20), '--disable-usage-stats',
                 *args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.processes.append(process)
        if index == 0:
            wait_for(lambda: self._running(process) and _accepts(self.port), 'the head node to listen')
        self.ray.init(address=self.address, logging_level='warning')
        try:
            wait_for(lambda: self._running(process) and len(_alive_node_cpus(self.ray)) == index + 1,
                      f'node {index} to join')
            node_id, = set(_alive_node_cpus(self.ray)) - set(self.node_ids)
        finally:
            self.ray.shutdown()
        self.node_ids.append(node_id)
        return node_id

    def kill_node(self, index):
        """SIGKILL node ``index``'s raylet and services (its workers exit with their raylet)."""
        os.killpg(self.processes[index].pid, signal.SIGKILL)
        self.processes[index].wait(timeout=WAIT_SECONDS)

    def stop(self):
        """SIGKILL every node, and give their processes a moment to be gone (so that none writes into the temporary
        folder after it is removed)."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=WAIT_SECONDS)
        for process in self.processes:
            try:
                wait_for(lambda: not _group_has_live_processes(process.pid), 'the nodes to end', seconds=10)
            except TimeoutError:
                pass  # a process that outlives SIGKILL for 10 s is the system's to reap

    def _running(self, process):
        if process.poll() is None:
            return True
        index = self.processes.index(process)
        with open(os.path.join(self.temp_dir, f'node{index}.log'), errors='replace') as log:
            raise RuntimeError(f"ray start of node {index} ended with {process.returncode}: {log.read()[-2000:]}")


def _group_has_live_processes(group):
    """Whether a process of ``group`` other than a zombie runs."""
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if fields[0] != 'Z' and int(fields[2]) == group:
                return True
    return False


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _accepts(port):
    with socket.socket() as sock:
        return sock.connect_ex(('127.0.0.1', port)) == 0


def wait_for(condition, what, seconds=WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds} s for {what}")
        time.sleep(0.2)


def ray_scaling(export_dir, folder, work_dir, options=None, pythonpath=None):
    """Images/s over ``folder`` of tools/infer.py's loop (one math thread, then two: this machine's two CPUs), then
    of tools/infer.py --ray on a local cluster of one node of one CPU, then of two such nodes (whole runs, from
    connecting to the last file written, and after the first image came back: without the actors' start-up)."""
    from emanet.integrations.ray import infer_on_ray
    results = {}
    for threads in (1, 2):
        segmenter = load_exported(export_dir, cpu_threads=threads, options=options)
        start = time.perf_counter()
        count = predict_images(segmenter, folder, os.path.join(work_dir, f'infer_{threads}'))
        results[f'infer_py_{threads}_threads'] = {'images': count, 'seconds': time.perf_counter() - start}
        del segmenter
    # A short folder: Ray's socket paths under it must stay within the 107 bytes a Unix socket allows.
    temp_dir = tempfile.mkdtemp(prefix='ray')
    cluster = LocalCluster(temp_dir, pythonpath)
    try:
        for nodes in (1, 2):
            cluster.add_node()
            report = infer_on_ray(export_dir, folder, os.path.join(work_dir, f'ray_{nodes}'), address=cluster.address,
                                  options=options)
            results[f'ray_{nodes}_nodes'] = {'images': report.done, 'seconds': report.seconds,
                                             'startup_seconds': report.startup_seconds,
                                             'per_node': dict(report.per_node)}
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    for result in results.values():
        result['images_per_s'] = result['images'] / result['seconds']
        if 'startup_seconds' in result:  # the first image came back at startup_seconds; the others after it
            result['steady_images_per_s'] = (result['images'] - 1) / (result['seconds'] - result['startup_seconds'])
    one, two = results['ray_1_nodes'], results['ray_2_nodes']
    results['two_nodes_over_one'] = two['images_per_s'] / one['images_per_s']
    results['two_nodes_over_one_steady'] = two['steady_images_per_s'] / one['steady_images_per_s']
    logger.info("[BENCH] Ray: two nodes of one CPU %.2fx one node (%.2fx after start-up)",
                results['two_nodes_over_one'], results['two_nodes_over_one_steady'])
    return results
