"""Worker-side helpers for the multi-rank tests (run under torchrun, gloo, CPU).

A worker script does ``from common import ...`` (torchrun puts the script's folder on
``sys.path``); this module puts the repository root on ``sys.path`` as well.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def setup(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, **parallel_kwargs: Any) -> None:
    """gloo process group from torchrun's environment, the CPU layer, Megatron's groups."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    from megatron_hyperball.compat import enable_cpu

    enable_cpu()
    from megatron_hyperball.megatron.model import init_parallel

    init_parallel(tp=tp, pp=pp, ep=ep, seed=seed, **parallel_kwargs)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def token_batch(step: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """The global batch for ``step``: (tokens, labels), identical on every rank.

    A learnable stream: tokens live in the first ``vocab // 8`` ids and follow
    x[t+1] = (3 x[t] + 1) mod (vocab // 8) from a random start, so a model's loss
    drops within a few steps (first by dropping unused ids, then by the rule).
    """
    active = max(2, vocab // 8)
    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randint(0, active, (batch, 1), generator=g)
    cols = [x]
    for _ in range(seq):
        x = (3 * x + 1) % active
        cols.append(x)
    data = torch.cat(cols, dim=1)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def dp_slice(x: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous share of a global batch."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    r = parallel_state.get_data_parallel_rank()
    assert x.shape[0] % dp == 0, "global batch must divide by the data-parallel size"
    n = x.shape[0] // dp
    return x[r * n : (r + 1) * n]


def lm_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a (DDP-wrapped) GPTModel over the local tokens."""
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    per_token = model(tokens, pos, None, labels=labels)
    return per_token.float().mean()


def train_step(model, optimizer, tokens: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    """One Megatron-style step: zero buffers, forward, backward, grad sync, optimizer step.

    Returns the loss averaged over data-parallel ranks and the optimizer's grad norm.
    """
    from megatron.core import parallel_state

    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = lm_loss(model, dp_slice(tokens), dp_slice(labels))
    loss.backward()
    model.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    reported = loss.detach().clone()
    dist.all_reduce(reported, group=parallel_state.get_data_parallel_group())
    reported /= parallel_state.get_data_parallel_world_size()
    return {"loss": reported.item(), "grad_norm": grad_norm, "ok": bool(ok)}


def full_params(model) -> Dict[str, torch.Tensor]:
    """Every parameter as a full (tensor-parallel-gathered) fp32 CPU tensor, by name."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        t = p.detach().float().cpu()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name.replace("module.", "")] = t.clone()
    return out


def write_result(path: Optional[str], result: Dict[str, Any], tensors: Optional[Dict] = None) -> None:
    """Rank 0 writes ``result`` as JSON to ``path`` (and ``tensors`` to ``path + '.pt'``)."""
    if rank() != 0 or path is None:
        return
    if tensors is not None:
        torch.save(tensors, path + ".pt")
        result = dict(result, tensors=path + ".pt")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Iterable):
        return list(x)
    return float(x)
