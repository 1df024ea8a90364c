"""Tensor-parallel attention and expert-parallel MoE over 2 gloo processes give the logits and
greedy tokens of one process (tiny model, float32, hash and dense layers, MTP included)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.cache.kv_cache import ModelCache
from dsv4.config import ModelConfig
from dsv4.distributed import ParallelGroup, check_parallel_config
from dsv4.model.batch import ForwardBatch, SeqChunk
from dsv4.model.init import init_random_
from dsv4.model.model import DeepseekV4Model
from dsv4.model.parallel import shard_state_dict

STEPS = 6


def _cfg():
    return ModelConfig.preset("tiny")  # 4 heads, 2 groups, 2 indexer heads, 8 experts: all split


def _run(model, prompt, device="cpu"):
    """Prefill then greedy decode; logits [1 + STEPS, V] (on the CPU) and the generated tokens."""
    cfg = model.cfg
    cache = ModelCache(cfg, num_slots=1, num_blocks=4, margin=8, dtype=model.dtype, device=device)
    chunk, pos, logits, toks = list(prompt), 0, [], []
    with torch.inference_mode():
        for _ in range(STEPS + 1):
            b = ForwardBatch([SeqChunk(chunk, pos, 0, [0, 1])], cfg.sliding_window,
                             cache.window_rows, cache.num_slots, device=device)
            x = model(b, cache)
            lg = model.logits(x[b.logits_indices])[0]
            nxt = torch.tensor(chunk[1:] + [int(lg.argmax())], device=device)
            mtp = model.mtp_logits(model.mtp_forward(x, nxt, b, cache))
            logits.append(torch.cat([lg, mtp[-1]]).float().cpu())
            pos += len(chunk)
            chunk = [int(lg.argmax())]
            toks.append(chunk[0])
    return torch.stack(logits), toks


def _join(rank, port, backend):
    """This rank's slice of the seed-4 tiny model, in a 2-rank group; on "nccl" on cuda:rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = _cfg()
    full = init_random_(DeepseekV4Model(cfg, dtype="float32"), seed=4).state_dict()
    tp = ParallelGroup(rank, 2)
    model = DeepseekV4Model(cfg, dtype="float32", tp=tp).eval()
    model.load_state_dict(shard_state_dict(full, cfg, tp))
    return model.to(device), device


def _worker(rank, port, prompt, q, backend="gloo"):
    """One rank of a 2-way tensor-parallel model, every rank running `_run` itself."""
    model, device = _join(rank, port, backend)
    logits, toks = _run(model, prompt, device)
    if rank == 0:
        q.put((logits, toks))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EagerGraphs:
    """`CUDAGraphRunner`'s interface, run eagerly: the lockstep protocol of graph steps on CPU."""

    def __init__(self, model, cache, max_num_seqs, tokens_per_seq, max_model_len, pad_slot,
                 pad_block, with_logits=True):
        self.model, self.cache, self.with_logits = model, cache, with_logits

    def run(self, batch, fill=None):
        if fill is not None:
            fill(batch.input_ids)
        x = self.model(batch, self.cache)
        return x, (self.model.logits(x) if self.with_logits else None)

    def greedy(self, n):
        return None  # no greedy graph: the sampler samples


def _lockstep_worker(rank, port, prompt, q, backend="gloo"):
    """Rank 0 drives the workers as the engine does (`LockstepModel`): the prefill eagerly,
    the decode steps through graphs captured on every rank (`capture_graphs`; `EagerGraphs`
    on gloo, real CUDA graphs on NCCL), every other one with its token written on the device
    as async scheduling does. Logits [1 + STEPS, V] and tokens, from rank 0."""
    from dsv4.engine import cuda_graph
    from dsv4.engine.parallel_workers import LockstepModel, leave_group, worker_loop
    if backend == "gloo":
        cuda_graph.CUDAGraphRunner = EagerGraphs
    model, device = _join(rank, port, backend)
    cfg = model.cfg
    cache = ModelCache(cfg, num_slots=2, num_blocks=8, margin=8, dtype=model.dtype, device=device)
    if rank:
        worker_loop(model, cache)
        leave_group()
        return
    lm = LockstepModel(model)
    graphs = lm.capture_graphs(cache, max_num_seqs=1, tokens_per_seq=1, max_model_len=256,
                               pad_slot=1, pad_block=7)
    logits, toks = [], []
    with torch.inference_mode():
        b = ForwardBatch([SeqChunk(list(prompt), 0, 0, [0, 1])], cfg.sliding_window,
                         cache.window_rows, cache.num_slots, device=device)
        lg = model.logits(lm(b, cache)[b.logits_indices])[0]
        for pos in range(len(prompt), len(prompt) + STEPS):
            logits.append(lg.float().cpu())
            toks.append(int(lg.argmax()))
            # odd steps as async scheduling launches them: the token reaches the ids on the
            # device (`fill`), the host's chunk holds a placeholder
            filled = pos % 2 == 1
            b = ForwardBatch([SeqChunk([0 if filled else toks[-1]], pos, 0, [0, 1])],
                             cfg.sliding_window, cache.window_rows, cache.num_slots, "cpu",
                             logits_indices=[0])
            fill = (lambda ids, t=toks[-1]: ids[:1].fill_(t)) if filled else None
            lg = graphs.run(b, fill)[1][0]
        logits.append(lg.float().cpu())
        toks.append(int(lg.argmax()))
    lm.stop()
    q.put((torch.stack(logits), toks))
    del graphs
    leave_group()


def run_two_ranks(prompt, backend="gloo", lockstep=False):
    """Logits and greedy tokens of the 2-rank model, from rank 0 (`lockstep`: driven as the
    engine drives it, decode steps through graphs)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    target = _lockstep_worker if lockstep else _worker
    procs = [ctx.Process(target=target, args=(r, port, prompt, q, backend)) for r in range(2)]
    for p in procs:
        p.start()
    logits, toks = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return logits, toks


def run_one_process(prompt, device="cpu"):
    model = init_random_(DeepseekV4Model(_cfg(), dtype="float32"), seed=4).eval()
    return _run(model.to(device), prompt, device)


def test_two_gloo_ranks_match_one_process():
    prompt = torch.randint(16, 512, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_logits, ref_toks = run_one_process(prompt)
    logits, toks = run_two_ranks(prompt)
    assert toks == ref_toks
    diff = (logits - ref_logits).abs().max()
    assert diff < 1e-3, f"TP=2 logits differ from one process by {diff:.2e}"


def test_graph_steps_replay_in_lockstep():
    """The workers capture their graphs when rank 0 does and replay one per rank-0 replay
    (graphs stand-in run eagerly on gloo; the CUDA graphs themselves: tests/gpu)."""
    prompt = torch.randint(16, 512, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    ref_logits, ref_toks = run_one_process(prompt)
    logits, toks = run_two_ranks(prompt, lockstep=True)
    assert toks == ref_toks
    diff = (logits - ref_logits[:, :logits.shape[1]]).abs().max()
    assert diff < 1e-3, f"lockstep graph steps differ from one process by {diff:.2e}"


def test_sizes_that_do_not_divide_are_refused_with_the_split_to_use():
    with pytest.raises(ValueError, match="num_attention_heads = 4 cannot be split over 3"):
        check_parallel_config(_cfg(), 3)


def test_tp_allreduce_setting_is_validated_and_off_gpus_stays_on_the_group(monkeypatch):
    """A bad DSV4_TP_ALLREDUCE names the choices; without CUDA the one-shot kernel stays off
    (its default-on path on two GPUs is tests/gpu/test_tensor_parallel_gpu.py's)."""
    from dsv4.distributed import enable_one_shot_all_reduce
    monkeypatch.setenv("DSV4_TP_ALLREDUCE", "ring")
    with pytest.raises(ValueError, match="DSV4_TP_ALLREDUCE='ring': use one-shot or nccl"):
        enable_one_shot_all_reduce(torch.bfloat16, torch.device("cpu"))
    for mode in ("one-shot", "nccl"):  # CPU, no process group: NCCL's path (a no-op at size 1)
        monkeypatch.setenv("DSV4_TP_ALLREDUCE", mode)
        assert not enable_one_shot_all_reduce(torch.bfloat16, torch.device("cpu"))


def test_engine_with_two_ranks_generates_what_one_process_generates():
    """`LLM(..., tensor_parallel_size=2)` spawns its worker rank itself; scheduler, sampler,
    MTP speculative decoding, prefix caching and structured outputs run unchanged on top."""
    from dsv4 import LLM, SamplingParams
    prompts = [[20 + i for i in range(n)] for n in (3, 9, 17)]
    long = [20 + (7 * i) % 300 for i in range(150)]  # resumed from the prefix cache at 128
    params = SamplingParams(temperature=0, max_tokens=8)
    ref = LLM(model="tiny", dtype="float32", device="cpu", enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts + [long], params,
                                                         use_tqdm=False)]
    tp = LLM(model="tiny", dtype="float32", device="cpu", tensor_parallel_size=2,
             speculative_tokens=2, enable_prefix_caching=True)
    try:
        got = [o.outputs[0].token_ids for o in tp.generate(prompts + [long], params,
                                                           use_tqdm=False)]
        again = tp.generate([long], params, use_tqdm=False)[0]
        constrained = SamplingParams(temperature=0, max_tokens=12,
                                     structured_outputs={"choice": ["alpha", "beta"]})
        choice = tp.generate([prompts[1]], constrained, use_tqdm=False)[0].outputs[0].text
    finally:
        tp.llm_engine.close()
    assert got == want
    assert again.num_cached_tokens == 128 and again.outputs[0].token_ids == want[-1]
    want_choice = ref.generate([prompts[1]], constrained, use_tqdm=False)[0].outputs[0].text
    assert choice == want_choice and choice in ("alpha", "beta")  # rank 0 masks and samples
