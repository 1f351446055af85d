"""Synchronized batch statistics across data-parallel processes (recnorm.convert_sync_batchnorm).

Two gloo processes each hold part of a batch of variable-length sequences, with different numbers of
time steps. With synchronized statistics, their outputs, running statistics and (DDP-averaged, times
the world size) gradients must equal those of one process running the whole batch."""

import datetime
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import recnorm

DT = torch.float64
LENGTHS = [[6, 3, 2], [4, 4, 1]]  # rank 0 runs 6 steps, rank 1 only 4
INDEX = [[0, 1, 2], [3, 4, 5]]


def _model(cell, norm):
    torch.manual_seed(0)
    cls = {"lstm": recnorm.LSTM, "gru": recnorm.GRU}[cell]
    model = cls(3, 4, num_layers=2, bidirectional=True, norm=norm, dtype=DT)
    with torch.no_grad():  # non-trivial gains
        for name, p in model.named_parameters():
            if name.startswith("norm_"):
                p.uniform_(0.5, 1.5)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 6, 3, generator=g, dtype=DT)
    w = torch.randn(6, 6, 8, generator=g, dtype=DT)
    return x, w


def _run(model, x, w, lengths):
    out, _ = model(pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False))
    out, _ = pad_packed_sequence(out, total_length=x.shape[0])  # padded positions are 0
    return out, (out * w[: x.shape[0], : x.shape[1]]).sum()



def _worker(rank, world, init_file, cell, norm, result_dir):
    # A bounded timeout: a rank stuck in a collective fails the test instead of hanging the session.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    model = recnorm.convert_sync_batchnorm(_model(cell, norm))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, w = _data()
    steps = max(LENGTHS[rank])
    xr, wr = x[:steps, INDEX[rank]], w[:steps, INDEX[rank]]
    out, loss = _run(ddp, xr, wr, LENGTHS[rank])
    loss.backward()
    grads = {n: p.grad.clone() * world for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        out_eval, _ = _run(model, xr, wr, LENGTHS[rank])
    torch.save(
        {"out": out.detach(), "out_eval": out_eval, "grads": grads, "buffers": {k: v.clone() for k, v in model.named_buffers()}},
        f"{result_dir}/{rank}.pt",
    )
    # Let every collective finish, and free DDP's reducer while the default group still holds the
    # process group: torch 2.13 can deadlock when the last reference to a gloo group goes while a
    # finished collective is still being freed on gloo's thread (the destructor joins that thread
    # holding the GIL, which the thread waits for).
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("cell,norm", [("lstm", "batch"), ("lstm", "shared_batch"), ("lstm", "sequence_batch"), ("gru", "batch")])
def test_synchronized_statistics_equal_one_process_on_the_whole_batch(tmp_path, cell, norm):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), cell, norm, str(tmp_path)), nprocs=2, join=True)

    single = _model(cell, norm)
    x, w = _data()
    out, loss = _run(single, x, w, LENGTHS[0] + LENGTHS[1])
    loss.backward()
    single.eval()
    with torch.no_grad():
        out_eval, _ = _run(single, x, w, LENGTHS[0] + LENGTHS[1])

    tol = {"rtol": 1e-9, "atol": 1e-10}
    for rank in (0, 1):
        r = torch.load(tmp_path / f"{rank}.pt")
        steps = max(LENGTHS[rank])
        torch.testing.assert_close(r["out"], out.detach()[:steps, INDEX[rank]], **tol)
        torch.testing.assert_close(r["out_eval"], out_eval[:steps, INDEX[rank]], **tol)
        for name, p in single.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, **tol, msg=f"gradient of {name} on rank {rank}")
        for name, b in single.named_buffers():
            torch.testing.assert_close(r["buffers"][name], b, **tol, msg=f"buffer {name} on rank {rank}")


def test_sync_is_inert_without_a_process_group():
    """Outside torch.distributed (or in eval) a synchronized layer computes exactly what it did before."""
    plain, synced = _model("lstm", "batch"), recnorm.convert_sync_batchnorm(_model("lstm", "batch"))
    assert all(m.sync for m in synced.modules() if isinstance(m, recnorm.RecurrentBatchNorm))
    assert "sync=True" in repr(synced)
    x, w = _data()
    a, b = _run(plain, x, w, [6, 3, 2, 4, 4, 1])[0], _run(synced, x, w, [6, 3, 2, 4, 4, 1])[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_forced_fast_kernel_refuses_synchronized_statistics(monkeypatch):
    from recnorm.nn import norms

    monkeypatch.setattr(norms, "sync_active", lambda sync, group=None: bool(sync))  # pretend a 2-process group
    model = recnorm.convert_sync_batchnorm(recnorm.LSTM(3, 4, norm="batch", kernel="fused"))
    with pytest.raises(ValueError, match="does not synchronize"):
        model(torch.randn(5, 2, 3))
