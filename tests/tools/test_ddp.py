"""recnorm layers under DistributedDataParallel (2 CPU processes, gloo): a training step runs,
gradients are averaged across processes, and the batch-norm buffers are broadcast from rank 0.

Batch statistics are per process here (like torch.nn.BatchNorm); test_sync.py covers synchronized ones."""

import datetime
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import recnorm



def _worker(rank, world, init_file, norm, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = recnorm.LSTM(3, 4, num_layers=2, norm=norm)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(6, 5, 3)
    out_, _ = ddp(x)
    out_.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.save({"grads": grads, "buffers": {k: v.clone() for k, v in model.named_buffers()}}, f"{out}/{rank}.pt")
    # Let every collective finish, and free DDP's reducer while the default group still holds the
    # process group: torch 2.13 can deadlock when the last reference to a gloo group goes while a
    # finished collective is still being freed on gloo's thread (the destructor joins that thread
    # holding the GIL, which the thread waits for).
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("norm", [None, "batch", "layer"])
def test_ddp_training_step(tmp_path, norm):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), norm, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    torch.testing.assert_close(r0["grads"], r1["grads"])  # averaged by DDP
    assert torch.isfinite(r0["grads"]).all() and r0["grads"].abs().sum() > 0
    for k in r0["buffers"]:  # each rank updated its running statistics with its own batch
        if norm == "batch" and "running_mean" in k and k.startswith("norm_ih_l0"):
            assert not torch.allclose(r0["buffers"][k][0], r1["buffers"][k][0])
