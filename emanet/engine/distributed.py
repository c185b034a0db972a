"""What data-parallel processes agree on: shares of a dataset, sums of counts, gradients, BatchNorm
statistics; and how they stop together.

Every function here is a no-op in a single process, so one code path serves both.

Stopping together. Under ``paddle.distributed.launch`` the processes wait for each other in gloo's
collectives, and gloo tells a process that another one stopped only as a broken connection: a
"TIMEOUT" or "Connection reset by peer" error, or, inside Paddle's backward pass, an abort of the
whole process (``terminate called after throwing an instance of 'gloo::IoException'``). A process
that stops answering without closing its connections is given up after gloo's fixed 30 seconds,
as is one that arrives at a collective 30 seconds after the others. So here:
- ``stop_together`` gives every process a watch, a thread keeping in touch with the others through
  the TCP store the launched processes met through (process 0 holds it): one process's error or
  SIGTERM ends every process within seconds, each with one sentence naming the process that
  stopped and why; a frozen process ends the others after SILENCE_SECONDS, saying so. A watch that
  cannot reach the store says so once and the run goes on without it: a watch's own trouble never
  stops or holds up a run;
- on CPU the gradients are averaged after the backward pass, not inside it (``data_parallel``);
- processes that may arrive far apart meet through the store first (``wait_for_peers``).
"""
import contextlib
import itertools
import os
import re
import signal
import socket
import sys
import threading
import time

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
from paddle.base import core
from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

from emanet.errors import UserError
from emanet.logger import logger

# Layers with running statistics (_mean, _variance): BatchNorm1D/2D/3D, SyncBatchNorm and the older BatchNorm.
BATCH_NORMS = (nn.layer.norm._BatchNormBase, nn.BatchNorm)

# How often a watch beats and reads the others' news.
POLL_SECONDS = 0.25
# How long a failing process waits for the others to have read why it stops (their watches read
# every POLL_SECONDS); within the 3 seconds the launcher leaves a process it stops.
ANNOUNCE_SECONDS = 2
# A process whose watch has not beaten for this long is taken for gone (frozen, or its machine or
# network is). Shorter than gloo's 30 seconds, after which a collective ends in an abort. Paddle's
# operators release the GIL: a watch thread beat every 0.5 s or sooner through a 3-minute step.
SILENCE_SECONDS = 20
# How often a watch reads the others' beats.
SILENCE_CHECK_SECONDS = 2
# How long a watch may take, once its process has joined the others, to connect to the store and have
# its first answer; after that it gives up, says so, and the run goes on without it. Paddle's own connect
# retries every 3 seconds without end, so the watch's guard keeps this deadline.
CONNECT_SECONDS = 10
# A process whose watch has not beaten this long after this one's joined is taken for one whose watch gave
# up: not waited for at meetings, not watched for silence. The processes join within about a second of
# each other (init_parallel_env is itself a meeting), and a watch gives up after CONNECT_SECONDS.
JOIN_SECONDS = 2 * CONNECT_SECONDS
# The exit code of a process ended because another one stopped: the tools' code for errors a user can act on.
EXIT_CODE = 2

_active_watch = None  # the watch of the running stop_together block, for wait_for_peers
_watch_numbers = itertools.count()


def process_share(count):
    """The indices of ``count`` items that this process takes: rank, rank + world size, ..."""
    return list(range(dist.get_rank(), count, dist.get_world_size()))


def sum_over_processes(array):
    """The element-wise sum of a numpy array over every process (an all-reduce; exact for integers).

    The processes may arrive far apart (evaluation shares differ by an image): they meet first
    (``wait_for_peers``), so that gloo's 30-second wait starts only when all are there.
    """
    if dist.get_world_size() == 1:
        return array
    wait_for_peers()
    total = paddle.to_tensor(np.ascontiguousarray(array))
    dist.all_reduce(total)
    return total.numpy()


def data_parallel(model):
    """``model`` wrapped for data-parallel training (``paddle.DataParallel``); itself in one process.

    With gloo (on CPU) the gradients are averaged by ``average_gradients`` after the backward pass
    rather than inside it: inside Paddle's backward pass, gloo's error about a process that was
    killed aborts the process (std::terminate); after it, the error can be told in a sentence
    (``stop_together``). The cost is the all-reduce no longer overlapping the backward pass: 0.29 s
    for the 42M gradients of an EMANet-ResNet50 whose step takes 10.5 s on two CPU cores.
    """
    if dist.get_world_size() == 1:
        return model
    wrapped = paddle.DataParallel(model)
    if dist.get_backend() == 'GLOO':
        wrapped.grad_need_sync = False  # averaged by average_gradients
    return wrapped


def average_gradients(trained_model):
    """Average the gradients over the processes where ``data_parallel`` left it to after the backward pass."""
    if isinstance(trained_model, paddle.DataParallel) and not trained_model.grad_need_sync:
        fused_allreduce_gradients(list(trained_model.parameters()), None)


def average_batch_norm_statistics(model):
    """Give every process the mean of all processes' BatchNorm running means and variances.

    Without SyncBatchNorm (on CPU there is no kernel for it) each rank's statistics follow its own
    share of the data; averaged before an evaluation or a save, every rank holds one model.
    SyncBatchNorm's statistics are already the same everywhere and are left as they are.
    """
    world_size = dist.get_world_size()
    if world_size == 1:
        return
    for layer in model.sublayers(include_self=True):
        if isinstance(layer, BATCH_NORMS) and not isinstance(layer, nn.SyncBatchNorm):
            for statistic in (layer._mean, layer._variance):
                total = statistic.clone()
                dist.all_reduce(total)
                paddle.assign(total / world_size, output=statistic)


def wait_for_peers():
    """Wait until every process of the run has reached this call, for as long as they are alive.

    A gloo collective gives up when the other processes arrive more than 30 seconds later; call
    this before one that processes may reach far apart. A no-op in one process and outside
    ``stop_together``.
    """
    if _active_watch is not None:
        _active_watch.meet()


@contextlib.contextmanager
def stop_together():
    """Run the body of a multi-process job so that no process outlives another's failure silently.

    In a run of several processes (``paddle.distributed.launch``), once this process has joined
    the others (``emanet.device.set_device``):
    - an exception leaving the block, or SIGTERM (its launcher was stopped), is told to the other
      processes before this one ends; each of them then ends at once, printing
      ``error: process R of N stopped: <that process's sentence>`` and exiting with code 2;
    - a process not heard from for SILENCE_SECONDS ends the others with a sentence saying so;
    - a gloo error leaving the block (a connection to another process broke or went silent)
      ends this process at once with a sentence saying so, rather than gloo's message (after a
      broken collective, Paddle's teardown of the process group may abort the process);
    - at the end of a run that went well, process 0, which holds the store the processes meet
      through, leaves last.
    During the block SIGTERM has a Python handler; afterwards the default one (Paddle's, which
    prints a report of the signal, is not put back). In a single process this does nothing.
    """
    global _active_watch
    world_size, address = dist.get_world_size(), store_address()
    if world_size == 1 or address is None or _active_watch is not None:
        yield
        return
    rank = dist.get_rank()
    watch = PeerWatch(rank, world_size, address, prefix=f'emanet/watch{next(_watch_numbers)}')
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_handler = signal.signal(signal.SIGTERM, watch.stop_on_signal)
    _active_watch = watch
    watch.start()
    try:
        yield
    except BaseException as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            watch.leave()
            raise
        watch.take_ending()
        lost = lost_peer_sentence(err, rank, world_size)
        if lost is not None:
            exit_now(lost, EXIT_CODE)
        watch.announce(reason_of(err))
        raise
    else:
        watch.leave()
    finally:
        _active_watch = None
        watch.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)


def store_address():
    """(host, port) of the TCP store the processes of paddle.distributed.launch meet through, or None.

    Where Paddle 3.3.1's processes meet: PADDLE_MASTER, which the launcher sets, else the first of
    PADDLE_TRAINER_ENDPOINTS (core.create_or_get_global_tcp_store, in C++). MASTER_ADDR and MASTER_PORT,
    which schedulers and PyTorch set-ups export, are not read: the launcher passes them through untouched,
    and init_parallel_env reads them into variables it never uses, meeting at PADDLE_MASTER whatever they say.
    Paddle's own store object (paddle.distributed.collective._default_store) is not shared: its client is
    one socket without a lock, which calls from the watch's thread would interleave with the main thread's.
    """
    endpoint = os.environ.get('PADDLE_MASTER') or os.environ.get('PADDLE_TRAINER_ENDPOINTS', '').split(',')[0]
    host, _, port = endpoint.rpartition(':')
    return (host, int(port)) if host and port.isdigit() else None


def reason_of(err):
    """One line saying why a process stops: a user error's sentence, else the exception's class and message."""
    if isinstance(err, UserError):
        text = str(err)
    elif isinstance(err, SystemExit):
        text = f"it exited with code {err.code}"
    else:
        text = f"{type(err).__name__}: {err}".rstrip(': ')
    return ' '.join(text.split())[:2000]


def lost_peer_sentence(err, rank, world_size):
    """For gloo's error about a connection that broke or went silent, a sentence saying so; else None."""
    message = str(err)
    if not isinstance(err, RuntimeError) or '/gloo/' not in message:
        return None
    peer = re.search(r'pair_rank = (\d+)', message)
    if peer or world_size == 2:
        who = f"process {peer.group(1) if peer else 1 - rank} of {world_size}"
    else:
        who = f"one of the other {world_size - 1} processes"
    return (f"lost contact with {who}: it stopped without a word (killed, or its machine or the network went "
            f"down) or did not answer for 30 seconds (gloo: {message.strip().splitlines()[0]})")


class PeerWatch:
    """This process's link to the others of its run, through the launcher's TCP store.

    A talking thread, every POLL_SECONDS, adds one to this process's beat counter, reads whether
    another process failed, and serves the main thread's requests (publish why this process
    stops, meet the others); every SILENCE_CHECK_SECONDS it reads the others' beat counters. A
    guarding thread watches the talking one: a call to a frozen store blocks without a timeout.
    The watch ends the process itself, with one ``error:`` line on stderr and exit code 2, when
    another process failed, went silent, or the store went away or silent: by then the main
    thread may be blocked in a collective that can only end in gloo's error or an abort.
    A watch that has not connected and heard back within CONNECT_SECONDS gives up instead, with one
    warning: it never had the store, so its silence says nothing about the others. Processes whose
    watches never beat are left out of the meetings and of the silence checks.

    Keys under ``prefix``: beat/R (counts up while process R is alive), reason/R and failed/R
    (why R stopped, once set), failed (how many stopped), read (how many read it), meeting/K
    (arrivals at the K-th ``meet``), left/R and left (processes done with a run that went well).
    """

    def __init__(self, rank, world_size, address, prefix):
        self.rank, self.world_size = rank, world_size
        self._address, self._prefix = address, prefix
        self._store = None
        self._pid = os.getpid()
        self._ending = threading.Lock()  # taken once, by the thread that decides how this process ends
        self._closed = threading.Event()
        self._connected = threading.Event()  # the store has answered this watch once
        self._gave_up = threading.Event()
        self._giving_up = threading.Lock()  # taken once, by the thread that says the watch gives up
        self._joined_at = None  # when this process had joined the others, from which CONNECT_SECONDS count
        self._without_watch = set()  # processes whose watch never beat within JOIN_SECONDS
        self._last_contact = time.monotonic()
        self._reason = None  # why this process stops, for the talking thread to publish
        self._published = False
        self._reason_read = threading.Event()  # every other process has read it, or failed too
        self._meeting = None  # [key, whether this process has arrived, Event set when everyone has]
        self._meeting_numbers = itertools.count()
        self._threads = [threading.Thread(target=self._talk, name='emanet-peer-watch', daemon=True),
                         threading.Thread(target=self._guard, name='emanet-peer-watch-guard', daemon=True)]

    def start(self):
        for thread in self._threads:
            thread.start()

    def close(self):
        self._closed.set()

    def take_ending(self, blocking=True):
        """Claim for the calling thread the decision how this process ends. Blocks while a watch
        thread is ending the process, which then never returns from here."""
        return self._ending.acquire(blocking=blocking)

    def announce(self, reason):
        """Tell the others why this process stops (the caller holds the ending) and wait at most
        ANNOUNCE_SECONDS for them to have read it."""
        if self._gave_up.is_set() or not dist.is_initialized() or not self._connected.wait(ANNOUNCE_SECONDS):
            return  # not joined yet, or no store: nobody to tell
        self._reason = reason
        self._reason_read.wait(ANNOUNCE_SECONDS)

    def stop_on_signal(self, signum, frame):
        """SIGTERM's handler during ``stop_together``: tell the others, then end this process."""
        if os.getpid() != self._pid:  # a data-loader worker forked with this handler: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not self.take_ending(blocking=False):
            return  # already ending: a repeated signal, or a failure being told
        name = signal.Signals(signum).name
        print(f"error: {name} received: process {self.rank} of {self.world_size} stops", file=sys.stderr, flush=True)
        self.announce(f"it received {name} (its launcher was stopped, or the system ended it)")
        exit_now(None, 128 + signum)

    def meet(self):
        """Wait until every process has called ``meet`` as often as this one (see ``wait_for_peers``)."""
        self._wait_for(f'meeting/{next(self._meeting_numbers)}')

    def leave(self):
        """Stop watching at the end of a run that went well. Process 0 leaves last: the store
        the others' watches talk to goes away with it."""
        if dist.is_initialized():
            self._wait_for('left')

    def _wait_for(self, key):
        everyone = threading.Event()
        self._meeting = [self._key(key), False, everyone]
        while not everyone.wait(POLL_SECONDS):  # the watch ends the process if the others never come
            if self._gave_up.is_set():
                return

    def _key(self, *parts):
        return '/'.join((self._prefix, *map(str, parts)))

    def _talk(self):
        while not dist.is_initialized():  # the store exists once this process has joined the others
            if self._closed.wait(POLL_SECONDS):
                return
        self._joined_at = time.monotonic()
        try:
            self._connect()
        except Exception as err:
            self._give_up(f"cannot connect to the store at {self._endpoint()} ({reason_of(err)})")
            return
        heard = {}  # other process -> (its beat count, when that count last changed)
        next_silence_check = time.monotonic() + SILENCE_CHECK_SECONDS
        while not self._closed.is_set():
            self._last_contact = time.monotonic()
            try:
                if self._exchange():
                    return
                self._connected.set()
                if time.monotonic() >= next_silence_check:
                    self._check_silence(heard)
                    next_silence_check = time.monotonic() + SILENCE_CHECK_SECONDS
            except Exception:  # the store is gone: process 0, which held it, stopped
                if self._closed.is_set():
                    return
                if not self._connected.is_set():
                    self._give_up(f"the store at {self._endpoint()} accepted the connection, then closed it")
                    return
                if self._published:
                    self._reason_read.set()  # process 0 ends only once it has read the reason, or dies
                self._end(f"lost contact with process 0 of {self.world_size}, which holds the store the processes "
                          "meet through: it stopped, or its machine or the network went down")
            self._closed.wait(POLL_SECONDS)

    def _connect(self):
        # Paddle's connect retries every 3 seconds without end, printing each try: a port where nothing
        # listens is turned down here at once instead.
        socket.create_connection(self._address, timeout=CONNECT_SECONDS).close()
        self._store = core.TCPStore(*self._address, False, 0)

    def _endpoint(self):
        return '%s:%d' % self._address

    def _guard(self):
        while not self._closed.wait(1):
            if self._connected.is_set():
                if time.monotonic() - self._last_contact > SILENCE_SECONDS:
                    self._end(f"no answer for {SILENCE_SECONDS} seconds from process 0 of {self.world_size}, which "
                              "holds the store the processes meet through: it hangs, or its machine or the network "
                              "went down")
            elif self._joined_at is not None and time.monotonic() - self._joined_at > CONNECT_SECONDS:
                self._give_up(f"no answer from the store at {self._endpoint()} within {CONNECT_SECONDS} seconds")

    def _give_up(self, why):
        """Stop watching, with one warning, when the store could not be reached: the run goes on without the watch."""
        if not self._giving_up.acquire(blocking=False) or self._connected.is_set():
            return
        self._gave_up.set()
        self._closed.set()  # a talking thread still stuck in a call to the store ends when the call returns
        logger.warning("peer watch of process %d of %d off: %s; the run goes on, but if a process fails the others "
                       "cannot be told why", self.rank, self.world_size, why)

    def _exchange(self):
        """One round of news with the other processes; True once this process has left the run."""
        store = self._store
        store.add(self._key('beat', self.rank), 1)
        if self._reason is not None and not self._published:
            store.set(self._key('reason', self.rank), self._reason)  # before the counters that lead to it
            store.add(self._key('failed', self.rank), 1)
            store.add(self._key('failed'), 1)
            self._published = True
        failed = store.add(self._key('failed'), 0)
        if self._published:
            if store.add(self._key('read'), 0) + failed >= self._watched_count():
                self._reason_read.set()
        elif failed:
            self._end_for_failed_peer()
        return self._meeting is not None and self._attend_meeting()

    def _watched_count(self):
        """How many processes meetings wait for: all but those whose watch never joined (JOIN_SECONDS)."""
        return self.world_size - len(self._without_watch)

    def _attend_meeting(self):
        """Arrive at the pending meeting and see whether everyone has; True once this process has left."""
        key, arrived, everyone = self._meeting
        leaving = key == self._key('left')
        if not arrived:
            if leaving:
                self._store.add(self._key('left', self.rank), 1)  # silent from now on, and rightly so
            self._store.add(key, 1)
            self._meeting[1] = True
        if leaving and self.rank != 0:
            self._closed.set()  # this watch calls the store no more, so process 0 may go
            everyone.set()
            return True
        if self._store.add(key, 0) >= self._watched_count():
            self._meeting = None
            if leaving:
                self._closed.set()
            everyone.set()
            return leaving
        return False

    def _end_for_failed_peer(self):
        for peer in range(self.world_size):
            if peer != self.rank and self._store.add(self._key('failed', peer), 0):
                reason = self._store.get(self._key('reason', peer)).decode(errors='replace')
                self._end(f"process {peer} of {self.world_size} stopped: {reason}", read_key=self._key('read'))

    def _check_silence(self, heard):
        now = time.monotonic()
        for peer in range(self.world_size):
            if peer == self.rank or self._store.add(self._key('left', peer), 0):
                continue
            beats = self._store.add(self._key('beat', peer), 0)
            if beats == 0:  # its watch has not joined: it may have given up, and says so itself
                if now - self._joined_at > JOIN_SECONDS:
                    self._without_watch.add(peer)
                continue
            self._without_watch.discard(peer)
            if heard.get(peer, (None,))[0] != beats:
                heard[peer] = (beats, now)
            elif now - heard[peer][1] > SILENCE_SECONDS:
                self._end(f"process {peer} of {self.world_size} has not been heard from for {SILENCE_SECONDS} "
                          "seconds: it hangs, or its machine or the network went down")

    def _end(self, sentence, read_key=None):
        """End this process with ``sentence``, unless another thread already decides how it ends."""
        if not self.take_ending(blocking=False):
            return
        print(f"error: {sentence}", file=sys.stderr, flush=True)
        if read_key is not None:
            with contextlib.suppress(Exception):
                self._store.add(read_key, 1)
        exit_now(None, EXIT_CODE)


def exit_now(sentence, code):
    """End this process at once, after ``error: sentence`` (if any) on stderr: its main thread may be
    blocked in a collective that never returns."""
    if sentence:
        print(f"error: {sentence}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
