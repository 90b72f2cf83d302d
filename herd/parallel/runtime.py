"""The processes of a tensor-parallel model and what passes between them.

`start(N)` makes a group of N ranks: it spawns ranks 1..N-1 itself (torch.multiprocessing), or,
under torchrun (WORLD_SIZE and RANK set), joins the group torchrun made; there every rank but 0
becomes a worker and exits when rank 0 stops. Rank 0 keeps HTTP, tokenization and sampling: it
sends each call (load a model, make a KV cache, run a forward step with its tokens and positions)
to the workers through a broadcast, then runs its own part; the layers' all-reduces meet.

Two process groups: commands wait as long as the server idles; the layers' collectives time out
after `timeout` seconds, so a rank that died mid-step raises instead of hanging. Rank 0 also
watches the processes it spawned and exits with an error as soon as one dies.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing.connection
import os
import socket
import sys
import threading
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from herd.errors import HerdError
from herd.model.kv_cache import KVCache, SlotCache
from herd.parallel.layers import check_shardable, set_compute_group
from herd.parallel.loading import load_shard, open_source, peak_rss
from herd.parallel.model import ShardedTransformer

STEP_TIMEOUT = 20.0  # seconds a layer's collective waits for the other ranks
_IDLE = timedelta(days=365)  # how long a worker waits for its next command
_CACHES = {"KVCache": KVCache, "SlotCache": SlotCache}
_state: dict = {"leader": None, "procs": [], "stopping": None}


def _host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


class Leader:
    """Rank 0's end of the command channel."""

    def __init__(self, group, world: int):
        self.group, self.world = group, world
        self.lock = threading.RLock()
        self.ids = itertools.count(1)
        self.freed: list[tuple] = []  # caches and models rank 0 dropped, for the workers to drop too

    def send(self, message: tuple) -> None:
        with self.lock:
            dist.broadcast_object_list([message], src=0, group=self.group)

    def load(self, source, dtype: torch.dtype | None, device: str, experts: str) -> tuple:
        with self.lock:
            mid = next(self.ids)
            self.send(("load", mid, str(source.path), dtype, device, experts))
            error, model, ckpt = None, None, None
            try:
                model, ckpt, report = load_shard(source, 0, self.world, dtype, device, experts)
            except HerdError as e:
                error, report = str(e), {}
            reports = [None] * self.world
            dist.all_gather_object(reports, (error, report), group=self.group)
        failed = [(rank, e) for rank, (e, _) in enumerate(reports) if e]
        if failed:
            raise HerdError(f"tensor-parallel rank {failed[0][0]}: {failed[0][1]}")
        model.mirror, model.tp_id, model.load_report = self, mid, [r for _, r in reports]
        weakref.finalize(model, self.freed.append, ("model", mid))
        return model, ckpt

    def peak_rss(self) -> list[int]:
        """Every rank's peak resident memory so far, in bytes."""
        with self.lock:
            self.send(("stats",))
            out = [None] * self.world
            dist.all_gather_object(out, peak_rss(), group=self.group)
        return out

    def new_cache(self, model: ShardedTransformer, cache: KVCache) -> None:
        with self.lock:
            cid = next(self.ids)
            cache.tp_id = cid
            self.send(("cache", model.tp_id, cid, type(cache).__name__, cache.batch_size, cache.max_seq_len,
                       cache.k.dtype))
        weakref.finalize(cache, self.freed.append, ("cache", cid))

    def forward(self, model: ShardedTransformer, tokens, input_pos, cache, logits_at) -> None:
        rows = None
        if cache is not None:
            base = getattr(cache, "cache", cache)  # a SlotRows view: its slots of the engine's SlotCache
            rows = (base.tp_id, getattr(cache, "slots", None), getattr(cache, "n_real", None))
        freed, self.freed = self.freed, []
        self.send(("forward", model.tp_id, _host(tokens), _host(input_pos), rows, _host(logits_at), freed))


def _worker_loop(rank: int, world: int, group) -> None:
    """Run rank 0's commands until it says stop."""
    models: dict[int, ShardedTransformer] = {}
    caches: dict[int, KVCache] = {}
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        op, *args = box[0]
        if op == "stop":
            return
        if op == "load":
            mid, path, dtype, device, experts = args
            error, report = None, {}
            try:
                source = open_source(path, dtype, rank)
                models[mid], _, report = load_shard(source, rank, world, dtype, device, experts, tokenizer=False)
            except HerdError as e:
                error = str(e)
            dist.all_gather_object([None] * world, (error, report), group=group)
        elif op == "stats":
            dist.all_gather_object([None] * world, peak_rss(), group=group)
        elif op == "cache":
            mid, cid, kind, batch, max_len, dtype = args
            caches[cid] = models[mid].new_cache(batch, max_len, dtype, kind=_CACHES[kind])
        else:
            mid, tokens, input_pos, rows, logits_at, freed = args
            for kind, key in freed:
                (models if kind == "model" else caches).pop(key, None)
            cache = None
            if rows is not None:
                cid, slots, n_real = rows
                cache = caches[cid] if slots is None else caches[cid].rows(slots, n_real)
            model = models[mid]
            device = model.device
            model(tokens.to(device), None if input_pos is None else input_pos.to(device), cache,
                  None if logits_at is None else logits_at.to(device))


def _join(rank: int, world: int, init_method: str, device: str, timeout: float):
    """Join the group; (command group). The layers' group is set for them."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=_IDLE)
    commands = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=_IDLE)
    set_compute_group(dist.new_group(backend=backend, timeout=timedelta(seconds=timeout)))
    return commands


def _orphan_watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)  # rank 0 died: nothing will come


def _spawned(rank: int, world: int, init_method: str, device: str, timeout: float, threads: int) -> None:
    """A worker process that rank 0 started."""
    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        group = _join(rank, world, init_method, device, timeout)
        with torch.inference_mode():
            _worker_loop(rank, world, group)
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001  (a dead peer or a timed-out step: say so in one line)
        print(f"herd: tensor-parallel rank {rank}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr, flush=True)
        os._exit(1)


def _watch(procs: list, stopping: threading.Event) -> None:
    """Exit rank 0 with an error as soon as a worker it spawned dies (unless it is stopping them)."""
    sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(procs, 1)}
    ready = multiprocessing.connection.wait(list(sentinels))
    if stopping.is_set():
        return
    rank, p = sentinels[ready[0]]
    p.join(1)
    print(f"herd: tensor-parallel rank {rank} died (exit code {p.exitcode}); stopping", file=sys.stderr, flush=True)
    os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(world: int, device: str = "cpu", timeout: float = STEP_TIMEOUT) -> Leader:
    """The group of `world` ranks, made once: spawned here, or joined under torchrun (where a
    rank other than 0 serves rank 0 and then exits the process)."""
    leader = _state["leader"]
    if leader is not None:
        if leader.world != world:
            raise HerdError(f"a tensor-parallel group of {leader.world} ranks is running; it cannot also have {world}")
        return leader
    threads = max(1, torch.get_num_threads() // world)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun made the group
        if int(os.environ["WORLD_SIZE"]) != world:
            raise HerdError(f"--tp {world}, but torchrun started {os.environ['WORLD_SIZE']} processes")
        rank, init_method, procs = int(os.environ["RANK"]), "env://", []
    else:
        rank, init_method = 0, f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_spawned, args=(r, world, init_method, device, timeout, threads), daemon=True,
                             name=f"herd-tp{r}") for r in range(1, world)]
        for p in procs:
            p.start()
    stopping = threading.Event()
    if procs:
        threading.Thread(target=_watch, args=(procs, stopping), daemon=True).start()
    torch.set_num_threads(threads)
    group = _join(rank, world, init_method, device, timeout)
    if rank != 0:
        with torch.inference_mode():
            _worker_loop(rank, world, group)
        dist.destroy_process_group()
        raise SystemExit(0)
    if _state["stopping"] is None:
        atexit.register(stop)
    _state.update(leader=Leader(group, world), procs=procs, stopping=stopping)
    return _state["leader"]


def stop() -> None:
    """Tell the workers to exit and leave the group (at exit, or to start another group)."""
    leader = _state["leader"]
    if leader is None:
        return
    _state["stopping"].set()
    try:
        leader.send(("stop",))
    except RuntimeError:  # a worker is gone already
        pass
    for p in _state["procs"]:
        p.join(10)
        if p.is_alive():
            p.terminate()
    dist.destroy_process_group()
    _state.update(leader=None, procs=[])


def load(path, world: int, dtype: torch.dtype | None, device: str = "cpu", experts: str = "across"):
    """(rank 0's ShardedTransformer, Checkpoint) of the checkpoint at `path` over `world` ranks.
    The config is checked against the split before any process starts or any weight is read."""
    source = open_source(path, dtype)
    check_shardable(source.config, world, experts)
    return start(world, device).load(source, dtype, device, experts)
