"""Drop-in details a user hits: empty batches, hand-built PackedSequences, checkpoints of batch norms, and
buffers written in place."""

import io

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import recnorm
from registry_cases import CELL_IDS, KERNEL_CELL_IDS, case_id, make

PAIRS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}


@pytest.mark.parametrize("cell", list(PAIRS))
@pytest.mark.parametrize("batch_first,bidir", [(False, False), (True, True)])
def test_empty_batch_gives_torch_nn_shapes(cell, batch_first, bidir):
    ours = make(cell, 3, 4, 2, batch_first=batch_first, bidirectional=bidir, norm="batch")
    theirs = PAIRS[cell](3, 4, 2, batch_first=batch_first, bidirectional=bidir)
    x = torch.randn(0, 5, 3) if batch_first else torch.randn(5, 0, 3)
    (o1, s1), (o2, s2) = ours(x), theirs(x)
    assert o1.shape == o2.shape
    for a, b in zip(s1 if isinstance(s1, tuple) else (s1,), s2 if isinstance(s2, tuple) else (s2,)):
        assert a.shape == b.shape


def _packed():
    return pack_padded_sequence(torch.randn(4, 3, 2), torch.tensor([4, 2, 3]), enforce_sorted=False)


@pytest.mark.parametrize("kernel", ["reference", "fused", "auto"])
@pytest.mark.parametrize("bad,match", [
    (lambda p: PackedSequence(p.data, torch.tensor([3, 3, 3, 1]), p.sorted_indices, p.unsorted_indices), "sum to 10 rows but the data has 9"),
    (lambda p: PackedSequence(p.data, torch.tensor([2, 3, 3, 1]), p.sorted_indices, p.unsorted_indices), "non-increasing"),
    (lambda p: PackedSequence(p.data, torch.tensor([3, 3, 3, 0]), p.sorted_indices, p.unsorted_indices), "positive"),
    (lambda p: PackedSequence(p.data, p.batch_sizes.float(), p.sorted_indices, p.unsorted_indices), "1-D int64"),
    (lambda p: PackedSequence(p.data, p.batch_sizes, torch.tensor([0, 0, 1]), p.unsorted_indices), "permutation of 0..2"),
    (lambda p: PackedSequence(p.data, p.batch_sizes, torch.tensor([0, 1]), torch.tensor([0, 1])), "3 indices"),
])
def test_malformed_packed_sequence_gets_one_clear_error_on_every_kernel(kernel, bad, match):
    m = recnorm.LSTM(2, 3, norm="layer", kernel=kernel)
    with pytest.raises(ValueError, match=match):
        m(bad(_packed()))


def _bytes(module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def test_batch_norm_checkpoints_store_the_tracked_steps_only_and_old_ones_load():
    m = recnorm.LSTM(8, 32, norm="batch")
    m(torch.randn(20, 4, 8))
    sd = m.state_dict()
    assert sd["norm_ih_l0.running_mean"].shape == (20, 128)  # not max_steps=1000
    assert _bytes(m) < 4 * _bytes(recnorm.LSTM(8, 32))  # was 99x; 20 tracked steps of statistics remain
    fresh = recnorm.LSTM(8, 32, norm="batch")
    fresh.load_state_dict(sd)  # strict: shorter slot buffers are padded as untracked
    assert fresh.norm_ih_l0.running_mean.shape == (1000, 128)
    assert torch.equal(fresh.norm_ih_l0.num_batches_tracked[20:], torch.zeros(980, dtype=torch.long))
    m.eval(), fresh.eval()
    x = torch.randn(30, 2, 8)
    torch.testing.assert_close(fresh(x)[0], m(x)[0])
    # an older checkpoint holding every slot loads as before
    full = {k: v for k, v in m.state_dict().items()}
    for name, b in m.named_buffers():
        full[name] = b.clone()
    fresh.load_state_dict(full)
    torch.testing.assert_close(fresh(x)[0], m(x)[0])


@pytest.mark.parametrize("cell", KERNEL_CELL_IDS)
def test_buffers_written_in_place_are_seen_by_every_kernel(cell):
    """The eval slot (the last tracked step) is read from num_batches_tracked at every call: writing the
    buffers in place never leaves a stale cached slot (it once gave a 1.4e-3 error)."""
    torch.manual_seed(0)
    ref = make(cell, 3, 4, norm="batch", kernel="reference")
    fast = make(cell, 3, 4, norm="batch", kernel="fused")
    fast.load_state_dict(ref.state_dict())
    for m in (ref, fast):
        m(torch.randn(5, 6, 3, generator=torch.Generator().manual_seed(1)))
        m.eval()
    x = torch.randn(8, 2, 3)
    ref(x), fast(x)
    with torch.no_grad():  # a slot becomes tracked in place, after an eval call
        for m in (ref, fast):
            for name, b in m.named_buffers():
                if name.endswith("num_batches_tracked"):
                    b[6] = 1
                elif name.endswith("running_mean"):
                    b[5:7] += 0.5
    torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
