"""The CPU layer ``megatron_hyperball.compat.enable_cpu`` itself, in a fresh single process.

megatron-core's real DDP / optimizers / GPTModel / tensor and pipeline parallelism /
dist-checkpointing on CPU with gloo are checked by ``tests/distributed/test_megatron_cpu.py``
(multi-rank, run under torchrun by ``tests/test_distributed.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def test_enable_cpu_is_explicit_idempotent_and_scoped(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        import torch, torch.distributed as dist
        real_current_device = torch.cuda.current_device
        import megatron_hyperball.compat as compat
        import megatron.core.optimizer.clip_grads as clip_grads
        assert not compat.is_enabled() and clip_grads.torch is torch, "patched on import"

        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        info = compat.enable_cpu()
        assert compat.is_enabled() and info["megatron_core"].startswith("0.19")
        assert info["heap_keeps_freed_memory"] is True  # glibc's mallopt accepted both thresholds
        assert compat.enable_cpu() == {{"already_enabled": True}}

        # Megatron's modules see a torch whose device is the CPU ...
        assert clip_grads.torch is not torch
        assert clip_grads.torch.zeros(2, device="cuda").device.type == "cpu"
        assert clip_grads.torch.cuda.current_device() == torch.device("cpu")
        # ... including modules imported afterwards ...
        late = "megatron.core.models.bert.bert_model"
        assert late not in sys.modules
        import importlib
        assert importlib.import_module(late).torch is not torch
        # ... while everyone else keeps the real torch.
        assert torch.cuda.current_device is real_current_device
        assert torch.zeros(1).type() == "torch.FloatTensor"
        if not torch.cuda.is_available():
            try:
                torch.zeros(1, device="cuda")
            except (RuntimeError, AssertionError):
                pass
            else:
                raise AssertionError("global torch was redirected")

        # The RNG tracker runs on the CPU generator: the data-parallel seed is the default
        # state, fork() switches to seed + 2718 + tp_rank and restores afterwards.
        from megatron.core import parallel_state, tensor_parallel
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.rand(3)
        default = torch.rand(3)
        assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718)))
        assert torch.equal(default, torch.rand(3, generator=torch.Generator().manual_seed(7)))

        b = compat.backends()
        assert b["adam"] in ("te_fused_adam", "apex_fused_adam", "torch_adamw"), b
        if not b["transformer_engine"] and not b["apex"]:
            assert b["adam"] == "torch_adamw" and b["adam_class"] == "torch.optim.adamw.AdamW", b
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-4000:]
