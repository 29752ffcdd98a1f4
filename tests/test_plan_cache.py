"""The ops' per-signature plan caches (CPU): keys of tensors, bounded storage."""

import torch

from jitkern.ops.signature import PlanCache, tensor_meta


def test_tensor_meta_tells_apart_what_validation_looks_at():
    t = torch.empty(4, 6)
    assert tensor_meta(None) is None
    assert tensor_meta(t) == tensor_meta(torch.empty(4, 6))
    others = [torch.empty(4, 7), torch.empty(6, 4).t(), torch.empty(4, 6, dtype=torch.float16)]
    assert all(tensor_meta(o) != tensor_meta(t) for o in others)
    # the device by index: CPU and meta are both -1 (no plan is ever made for either, and each
    # op keys its first tensor's device whole: the GPU tests check a moved tensor still fails)
    assert tensor_meta(t)[3] == tensor_meta(torch.empty(4, 6, device="meta"))[3] == -1


def test_plan_cache_is_bounded_and_ignores_calls_without_a_signature():
    c = PlanCache(limit=3)
    c.put(None, "never")
    assert len(c) == 0 and c.get(None) is None
    for i in range(3):
        c.put(i, f"plan{i}")
    assert [c.get(i) for i in range(3)] == ["plan0", "plan1", "plan2"]
    c.put(3, "plan3")   # full: emptied, then the new plan stored
    assert len(c) == 1 and c.get(0) is None and c.get(3) == "plan3"
    c.clear()
    assert len(c) == 0
