"""kernels/slots.py: OffloadKV's slot assignment, the reference against the rule written by hand in
plain Python, and the Triton kernel against the reference (interpreted)."""
import pytest
import torch

from interpreted import check_interpreted


def _assign_by_hand(slots: list[int], new: list[int]) -> tuple[list[int], list[bool]]:
    """kernels/slots.py's rule, one head, in plain Python: kept slots stay, the free ones (in slot
    order) take the chunks no slot holds (in id order)."""
    absent = iter(c for c in new if c not in slots)
    kept = [c in new for c in slots]
    return [c if keep else next(absent) for c, keep in zip(slots, kept)], [not keep for keep in kept]


def _slot_cases():
    """(slots, new) pairs: the docstring's example, a first step (every slot free, -1), nothing
    changing, everything changing, a search that runs off its head's row, and random overlaps, with
    k from 1 to 37."""
    g = torch.Generator().manual_seed(0)
    yield torch.tensor([[[7, 2, 9, 4]]]), torch.tensor([[[2, 4, 5, 8]]])
    yield torch.full((1, 2, 5), -1), torch.tensor([[[0, 3, 4, 8, 9], [1, 2, 3, 4, 5]]])
    yield torch.tensor([[[3, 1, 2]]]), torch.tensor([[[1, 2, 3]]])
    yield torch.tensor([[[3, 1, 2]]]), torch.tensor([[[4, 5, 6]]])
    # a slot past every chunk of its head, equal to the next head's first: the search ends at k and
    # must not read the next head's row as its own
    yield torch.tensor([[[5, 0], [5, 6]]]), torch.tensor([[[0, 1], [5, 6]]])
    for B, H, k, N in [(1, 1, 1, 3), (2, 3, 8, 20), (1, 4, 37, 60), (2, 2, 16, 17)]:
        slots = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * H)]).view(B, H, k)
        new = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * H)]).view(B, H, k).sort(-1).values
        yield slots, new


@pytest.mark.parametrize("chunk", [1, 4])
def test_assign_slots_reference_follows_the_rule(chunk):
    from kernels.slots import assign_slots_ref
    for slots, new in _slot_cases():
        for reuse in (True, False):
            s = slots.clone()
            rows, wanted = assign_slots_ref(s, new, chunk, reuse)
            for b, h in [(b, h) for b in range(new.shape[0]) for h in range(new.shape[1])]:
                want_slots, fresh = _assign_by_hand(slots[b, h].tolist(), new[b, h].tolist())
                assert s[b, h].tolist() == want_slots and sorted(want_slots) == new[b, h].tolist()
                assert rows[b, h].tolist() == [c * chunk + r for c in want_slots for r in range(chunk)]
                assert wanted[b, h].tolist() == [f or not reuse for f in fresh for _ in range(chunk)]


SLOTS_CHECK = r"""
import os, torch
from test_slots import _slot_cases
from kernels.slots import assign_slots, assign_slots_ref, assign_slots_triton
bad = n = 0
for slots, new in _slot_cases():
    for chunk in (1, 3, 16):
        for reuse in (True, False):
            a, b = slots.clone(), slots.clone()
            ra, wa = assign_slots_ref(a, new, chunk, reuse)
            rb, wb = assign_slots_triton(b, new, chunk, reuse)
            n += 1
            if not (torch.equal(a, b) and torch.equal(ra, rb) and torch.equal(wa, wb)):
                bad += 1
                print("MISMATCH", slots.shape, chunk, reuse, a.tolist(), b.tolist())
# a row of more than 2048 slots: BLOCK 4096 (8 warps on a GPU)
g = torch.Generator().manual_seed(1)
slots = torch.randperm(9000, generator=g)[:3000].view(1, 1, -1)
new = torch.randperm(9000, generator=g)[:3000].sort().values.view(1, 1, -1)
a, b = slots.clone(), slots.clone()
n += 1
if not all(torch.equal(x, y) for x, y in zip(assign_slots_ref(a, new, 1) + (a,), assign_slots_triton(b, new, 1) + (b,))):
    bad += 1
    print("MISMATCH at k = 3000")
os.environ["LAYERKV_KERNELS"] = "triton"
slots, new = torch.tensor([[[7, 2, 9, 4]]]), torch.tensor([[[2, 4, 5, 8]]])
assign_slots(slots, new, 1)
if slots.tolist() != [[[5, 2, 8, 4]]]:
    bad += 1
    print("FAIL dispatch", slots.tolist())
# past MAX_K slots the reference runs (the kernel refuses: its registers would spill)
from kernels.slots import MAX_K
k = MAX_K + 1
slots = torch.arange(k).view(1, 1, -1).flip(-1).contiguous()
new = (torch.arange(k) + k // 2).view(1, 1, -1)
a, b = slots.clone(), slots.clone()
if not all(torch.equal(x, y) for x, y in zip(assign_slots_ref(a, new, 1) + (a,), assign_slots(b, new, 1) + (b,))):
    bad += 1
    print("FAIL dispatch past MAX_K")
try:
    assign_slots_triton(slots.clone(), new, 1)
    bad += 1
    print("FAIL: the kernel took", k, "slots")
except ValueError:
    pass
print(n, "cases, cases failed:", bad)
"""


def test_assign_slots_triton_matches_reference():
    check_interpreted(SLOTS_CHECK)
