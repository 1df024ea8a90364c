"""Several GPUs (or gloo processes on CPU) behind one engine.

Rank 0 runs everything a single process runs: scheduler, sampler, server. Every rank holds its
slice of the weights (`model/parallel.py`) and a full copy of the caches (the latent kv and the
compressors are computed in full on every rank). The ranks must make the same collective calls
in the same order, so rank 0 drives them: before each model call it broadcasts a small command
(the step's chunks; for the MTP layer also its input state), and the workers replay it on their
slices. Sampling needs nothing from them: the head is replicated.

Launch: `LLMEngine.from_args(..., tensor_parallel_size=N)` (and `dsv4 serve
--tensor-parallel-size N`) spawns ranks 1..N-1 itself; under `torchrun` (several nodes) every
rank runs the same command and ranks other than 0 become workers (`dsv4.cli`).
"""
from __future__ import annotations

import gc
import logging
import os
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from ..cache.kv_cache import ModelCache
from ..distributed import ParallelGroup, disable_one_shot_all_reduce, enable_one_shot_all_reduce
from ..model.batch import ForwardBatch, SeqChunk

logger = logging.getLogger(__name__)


def _describe(batch: ForwardBatch) -> tuple:
    return ([(c.tokens, c.start_pos, c.slot, c.block_table, c.snapshots) for c in batch.chunks],
            batch.logits_indices.tolist())


def _rebuild(desc: tuple, model, cache: ModelCache, device=None) -> ForwardBatch:
    chunks, logits = desc
    return ForwardBatch([SeqChunk(*c) for c in chunks], model.cfg.sliding_window,
                        cache.window_rows, cache.num_slots, device or cache.device,
                        logits_indices=logits)


_commands = None  # the process group commands travel in (`_command_group`)


def _command_group():
    """Commands travel over gloo, on the CPUs, even between GPUs: an NCCL broadcast of a pickled
    command reaches a worker's host only once its GPU has finished the previous step, which would
    put the worker's host work (building the step's batch) between its GPU steps instead of
    under them. Created at the first command, which every rank sends or awaits; its timeout is
    a year, as workers of an idle server wait for the next command as long as it idles."""
    global _commands
    if _commands is None:
        _commands = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    return _commands


def _bcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_command_group())
    return box[0]


def _share_ids(ids: torch.Tensor) -> None:
    """Rank 0's input ids of a step whose tokens were sampled on the device (async scheduling)
    reach the workers on the device too, in stream order."""
    dist.broadcast(ids, src=0)


class LockstepModel:
    """Rank 0's view of the sharded model: the same calls as DeepseekV4Model, each announced
    to the workers first."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, batch: ForwardBatch, cache: ModelCache) -> torch.Tensor:
        _bcast(("forward", _describe(batch)))
        return self._model(batch, cache)

    def mtp_forward(self, h: torch.Tensor, next_ids, batch: ForwardBatch, cache: ModelCache,
                    j: int = 0) -> torch.Tensor:
        _bcast(("mtp", _describe(batch), tuple(h.shape), j))
        dist.broadcast(h.contiguous(), src=0)
        return self._model.mtp_forward(h, next_ids, batch, cache, j)

    def capture_graphs(self, cache: ModelCache, **graph_args) -> "LockstepGraphs":
        """CUDA graphs of decode steps on every rank (`CUDAGraphRunner` arguments): the ranks
        capture the same sizes in the same order, so the all-reduces recorded in each rank's
        graphs meet when the graphs replay."""
        from .cuda_graph import CUDAGraphRunner
        _bcast(("graphs", graph_args))
        return LockstepGraphs(CUDAGraphRunner(self._model, cache, **graph_args))

    def copy_slots(self, cache: ModelCache, pairs: list[tuple[int, int]]) -> None:
        """`ModelCache.copy_slots` on every rank (each holds a full copy of the caches)."""
        _bcast(("copy", pairs))
        cache.copy_slots(pairs)

    def stop(self) -> None:
        _bcast(("stop",))


class LockstepGraphs:
    """Rank 0's CUDA graphs: each replay is announced to the workers, which replay theirs."""

    def __init__(self, graphs):
        self._graphs = graphs

    def __getattr__(self, name):
        return getattr(self._graphs, name)

    def run(self, batch: ForwardBatch, fill=None):
        """`fill` (a step launched before its tokens reached the host) writes rank 0's ids;
        the workers then take them from rank 0 (`_share_ids`) before their replays."""
        _bcast(("graph", _describe(batch), fill is not None))
        share = None
        if fill is not None:
            def share(ids):
                fill(ids)
                _share_ids(ids)
        return self._graphs.run(batch, share)


def leave_group(timeout: float = 60.0) -> None:
    """Destroy the process group once this rank's CUDA graphs are gone: NCCL does not tear down
    a communicator while graphs that recorded its collectives live, and waits for them forever
    (measured on two H200s: every rank stuck in destroy_process_group). Drop the references to
    the graphs first; if the group still does not go within `timeout`, warn and leave it."""
    global _commands
    if not dist.is_initialized():
        return
    _commands = None
    disable_one_shot_all_reduce()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    done = threading.Thread(target=dist.destroy_process_group, daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        logger.warning("the process group did not shut down within %.0f s; leaving it", timeout)


def worker_loop(model, cache: ModelCache) -> None:
    """Replay rank 0's model calls (and its CUDA graphs) until it says stop."""
    graphs = None
    with torch.inference_mode():
        while True:
            cmd = _bcast(None)
            if cmd[0] == "stop":
                return
            if cmd[0] == "copy":
                cache.copy_slots(cmd[1])
                continue
            if cmd[0] == "graphs":
                from .cuda_graph import CUDAGraphRunner
                graphs = CUDAGraphRunner(model, cache, **cmd[1], with_logits=False)
                continue
            if cmd[0] == "graph":  # a graph step's indices are built on the host
                batch = _rebuild(cmd[1], model, cache, "cpu")
                graphs.run(batch, _share_ids if cmd[2] else None)
                continue
            batch = _rebuild(cmd[1], model, cache)
            if cmd[0] == "forward":
                model(batch, cache)
            else:
                h = torch.empty(cmd[2], dtype=model.dtype, device=cache.device)
                dist.broadcast(h, src=0)
                model.mtp_forward(h, batch.input_ids, batch, cache, cmd[3])


def share_cache_geometry(num_slots: int = 0, num_blocks: int = 0, margin: int = 0,
                         kv_fp8: bool = False) -> tuple[int, int, int, bool]:
    """Rank 0 sizes the cache; every rank allocates the same."""
    return _bcast((num_slots, num_blocks, margin, kv_fp8))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(rank: int, world: int, port: int, device_type: str) -> ParallelGroup:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return ParallelGroup(rank, world)


def spawned_worker(rank: int, world: int, port: int, model_name: str, kwargs: dict) -> None:
    """Entry point of ranks 1..N-1 started by `spawn_workers`."""
    from .llm_engine import load_model as load_engine_model
    device = torch.device(kwargs["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    tp = init_group(rank, world, port, device.type)
    run_worker(model_name, kwargs, device, tp, load_engine_model)


def run_worker(model_name: str, kwargs: dict, device, tp: ParallelGroup, load) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // tp.size))
    model, cfg, _, _ = load(model_name, kwargs["dtype"], device, kwargs["seed"], True,
                            kwargs["load_format"], tp)
    num_slots, num_blocks, margin, kv_fp8 = share_cache_geometry()
    cache = ModelCache(cfg, num_slots, num_blocks, margin, model.dtype, device, kv_fp8=kv_fp8,
                       index_fp4=model.qat)
    enable_one_shot_all_reduce(model.dtype, device)
    worker_loop(model, cache)
    leave_group()


def spawn_workers(world: int, model_name: str, kwargs: dict) -> tuple[list, int]:
    """Start ranks 1..world-1 as processes; returns them and the rendezvous port."""
    import torch.multiprocessing as mp
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=spawned_worker, args=(r, world, port, model_name, kwargs),
                         daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    return procs, port
