"""Tensor and expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

A `ParallelGroup` is what the model needs to know: its rank, the group size, and the two
collectives it uses (sum of partial results, gather of vocabulary shards). With size 1 every
call is a no-op, so the single-process path is unchanged.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            one_shot = _one_shot.get(x.dtype)
            if one_shot is not None and x.is_cuda and x.numel() <= one_shot[0].numel():
                buf, name = one_shot
                return torch.ops.symm_mem.one_shot_all_reduce_copy(
                    buf[:x.numel()].view(x.shape), x.contiguous(), "sum", name)
            dist.all_reduce(x, group=self.group)
        return x

    def split(self, total: int, what: str, multiple: int = 1) -> tuple[int, int]:
        """(start, length) of this rank's share of `total`; refuses sizes that do not divide."""
        if total % self.size or (total // self.size) % multiple:
            raise ValueError(
                f"{what} = {total} cannot be split over {self.size} ranks"
                + (f" in multiples of {multiple}" if multiple > 1 else "")
                + f"; use a tensor-parallel size that divides it (e.g. "
                f"{', '.join(str(s) for s in range(1, 17) if total % s == 0 and (total // s) % multiple == 0 and s > 1)})")
        n = total // self.size
        return self.rank * n, n


SINGLE = ParallelGroup()

# dtype -> (symmetric buffer, group name): all-reduces that fit go through the one-shot kernel
_one_shot: dict[torch.dtype, tuple[torch.Tensor, str]] = {}
# group names this process has set symmetric memory up for: torch keeps a name's store for the
# life of the process, so a later process group of the same name (a second tensor-parallel
# engine in one process) would rendezvous through the first one's store and wait forever
_rendezvoused: set[str] = set()
ONE_SHOT_MAX_BYTES = 1 << 20


def enable_one_shot_all_reduce(dtype: torch.dtype, device: torch.device) -> bool:
    """All-reduces of up to ONE_SHOT_MAX_BYTES (decode steps) go through torch's symmetric-
    memory one-shot kernel, which reads every peer's buffer over NVLink (no multicast), instead
    of NCCL's ring: 6.9 against 14.7 us for a token's 4096 bf16 values inside a CUDA graph on
    two H200s. The default when every rank is on one host; `DSV4_TP_ALLREDUCE=nccl` keeps
    NCCL. Collective: every rank calls it at the same point. Returns whether it is on."""
    mode = os.environ.get("DSV4_TP_ALLREDUCE", "one-shot")
    if mode not in ("one-shot", "nccl"):
        raise ValueError(f"DSV4_TP_ALLREDUCE={mode!r}: use one-shot or nccl")
    if (mode != "one-shot" or device.type != "cuda" or not dist.is_initialized()
            or dist.get_world_size() == 1 or not _one_host()):
        return False
    import torch.distributed._symmetric_memory as symm_mem
    name = dist.group.WORLD.group_name
    # every rank must take the same path: agree on whether all of them reach their peers and
    # none has set this group name up before
    ok = torch.tensor([int(_peers_reachable(device)), int(name not in _rendezvoused)],
                      device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok[0].item():
        logger.warning("tensor parallel: the GPUs cannot read each other's memory (no P2P): "
                       "all-reduces stay on NCCL")
        return False
    if not ok[1].item():
        if dist.get_rank() == 0:
            logger.warning("tensor parallel: symmetric memory was set up for an earlier engine "
                           "in this process (torch keeps it until the process exits): this "
                           "engine's all-reduces stay on NCCL")
        return False
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.11
        with warnings.catch_warnings():  # 2.11 warns that it no longer is
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // itemsize, dtype=dtype, device=device)
    _rendezvoused.add(name)
    symm_mem.rendezvous(buf, name)
    _one_shot[dtype] = (buf, name)
    return True


def _one_host() -> bool:
    """Whether every rank runs on this host (P2P reads need NVLink or PCIe peers): true for
    the engine's own worker processes, and under torchrun when its local world is the world."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is None or int(local) == dist.get_world_size()


def _peers_reachable(device: torch.device) -> bool:
    """Whether this rank's GPU can read every other visible GPU's memory (NVLink or PCIe P2P;
    not in some VMs and PCIe topologies). Where a rank sees only its own GPU, symmetric memory
    itself decides."""
    me = device.index if device.index is not None else torch.cuda.current_device()
    return all(torch.cuda.can_device_access_peer(me, j)
               for j in range(torch.cuda.device_count()) if j != me)


def disable_one_shot_all_reduce() -> None:
    _one_shot.clear()


def check_parallel_config(cfg, size: int) -> None:
    """Every split the model makes, checked once at start-up with a message saying what to use."""
    g = ParallelGroup(0, size)
    g.split(cfg.num_attention_heads, "num_attention_heads")
    g.split(cfg.o_groups, "o_groups")
    g.split(cfg.vocab_size, "vocab_size")
    g.split(cfg.n_routed_experts, "n_routed_experts")
    if any(m == 4 for m in cfg.compress_ratios):
        g.split(cfg.index_n_heads, "index_n_heads")
    block = 128 if cfg.weight_format != "bf16" else 1
    g.split(cfg.moe_intermediate_size, "moe_intermediate_size (shared expert)", block)


def init_from_env(backend: str | None = None) -> ParallelGroup:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return ParallelGroup(dist.get_rank(), dist.get_world_size(), None)
