"""Shared helpers of the CPU model tests: tiny models, caches, chunked runs."""
import torch

from dsv4.cache.kv_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.model.batch import ForwardBatch, SeqChunk
from dsv4.model.init import init_random_
from dsv4.model.model import DeepseekV4Model

torch.set_num_threads(1)  # several test processes may share the 2 cores


def make_model(dtype="float32", seed=0, qat=True, **changes):
    cfg = ModelConfig.preset("tiny")
    if changes:
        cfg = cfg.replace(**changes)
    model = DeepseekV4Model(cfg, dtype=dtype, qat=qat).eval()
    return init_random_(model, seed)


def make_cache(model, num_slots=4, num_blocks=16, margin=8, index_fp4=None):
    """As the engine makes it: indexer keys packed as FP4 when the model's QAT allows."""
    return ModelCache(model.cfg, num_slots=num_slots, num_blocks=num_blocks, margin=margin,
                      dtype=model.dtype,
                      index_fp4=model.qat if index_fp4 is None else index_fp4)


def run_chunks(model, cache, ids, sizes, slot=0, blocks=None, all_logits=True):
    """Feed `ids` to one sequence in chunks of `sizes`; returns logits at every fed position."""
    blocks = blocks if blocks is not None else list(range(slot * 4, slot * 4 + 4))
    out, p = [], 0
    for n in sizes:
        chunk = ids[p:p + n]
        b = ForwardBatch([SeqChunk(chunk, p, slot, blocks)], model.cfg.sliding_window,
                         cache.window_rows, cache.num_slots,
                         logits_indices=list(range(len(chunk))) if all_logits else None)
        with torch.inference_mode():
            out.append(model.logits(model(b, cache)[b.logits_indices]))
        p += n
    return torch.cat(out)


def prefill_logits(model, ids):
    """Logits at every position of one prefill of `ids` in a fresh cache."""
    blocks = list(range(-(-len(ids) // 128) + 1))
    cache = make_cache(model, num_slots=1, num_blocks=len(blocks))
    return run_chunks(model, cache, ids, [len(ids)], blocks=blocks)
