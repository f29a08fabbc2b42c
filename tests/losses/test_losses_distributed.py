"""Two real CPU processes (gloo): Sinkhorn-Knopp and the centers over processes equal one
process holding the concatenated batch.

One spawn runs every scenario (torch import in the children dominates the cost); the
individual tests then assert on the saved results.
"""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loss_naive_refs as ref
from ssl_vit.losses import DINOLoss, IBOTPatchLoss, all_reduce_mean, all_reduce_sum, sinkhorn_knopp, world_size

WORLD = 2
K = 6
TEMP = 0.07
SPAWN_TIMEOUT_S = 90


def _make_inputs():
    gen = torch.Generator().manual_seed(1234)
    # DINO cls variant, equal halves: process r holds images [2r, 2r+2) of both global crops,
    # stacked as (2 * B_local, K).
    cls_equal = [torch.randn(4, K, generator=gen) for _ in range(WORLD)]
    # unequal number of samples per process (3 vs 5 rows), B obtained by all-reduce
    cls_unequal = [torch.randn(3, K, generator=gen), torch.randn(5, K, generator=gen)]
    # iBOT masked tokens: 5 on one process, 9 on the other
    tokens = [torch.randn(5, K, generator=gen), torch.randn(9, K, generator=gen)]
    # center updates, unequal batch sizes: 2 vs 3 images per process, (2 * B_local, K) each
    center_logits = [torch.randn(4, K, generator=gen) * 3, torch.randn(6, K, generator=gen) * 3]
    center0 = torch.randn(1, K, generator=gen)
    return dict(cls_equal=cls_equal, cls_unequal=cls_unequal, tokens=tokens, center_logits=center_logits, center0=center0)


def _worker(rank, init_file, in_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        inp = torch.load(in_path)
        out = {"world_size": world_size()}
        out["sum"] = all_reduce_sum(torch.tensor([float(rank + 1)])).item()
        out["mean"] = all_reduce_mean(torch.tensor([float(rank + 1)])).item()

        dino = DINOLoss(K)
        out["sk_cls_equal"] = dino.sinkhorn_teacher(inp["cls_equal"][rank], TEMP)
        out["sk_cls_unequal"] = sinkhorn_knopp(inp["cls_unequal"][rank], TEMP)
        ibot = IBOTPatchLoss(K)
        n_total = sum(t.shape[0] for t in inp["tokens"])
        out["sk_tokens_explicit"] = ibot.sinkhorn_teacher(inp["tokens"][rank], TEMP, n_total)
        out["sk_tokens_implicit"] = ibot.sinkhorn_teacher(inp["tokens"][rank], TEMP)

        dino.center.copy_(inp["center0"])
        local = inp["center_logits"][rank]
        dino.update_center(list(local.chunk(2)))  # both global crops of this process
        out["dino_center"] = dino.center.clone()
        ibot.center.copy_(inp["center0"])
        ibot.update_center(inp["tokens"][rank])
        out["ibot_center"] = ibot.center.clone()
        torch.save(out, f"{out_dir}/out_{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    inputs = _make_inputs()
    torch.save(inputs, tmp / "inputs.pt")
    ctx = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "inputs.pt"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"two-process gloo run did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:  # only the two processes spawned above
            if p.is_alive():
                p.terminate()
                p.join()
    outs = [torch.load(tmp / f"out_{r}.pt") for r in range(WORLD)]
    return inputs, outs


def test_helpers_reduce_over_processes(two_process_results):
    _, outs = two_process_results
    for o in outs:
        assert o["world_size"] == 2 and o["sum"] == 3.0 and o["mean"] == 1.5


def test_helpers_are_no_ops_without_a_process_group():
    assert not dist.is_initialized()
    t = torch.tensor([2.0, 3.0])
    assert world_size() == 1
    assert torch.equal(all_reduce_sum(t), torch.tensor([2.0, 3.0]))
    assert torch.equal(all_reduce_mean(t), torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("key", ["cls_equal", "cls_unequal"])
def test_sinkhorn_cls_two_processes_equal_one_process_with_concatenated_batch(two_process_results, key):
    inputs, outs = two_process_results
    full = torch.cat(inputs[key])
    single = sinkhorn_knopp(full, TEMP)
    multi = torch.cat([o[f"sk_{key}"] for o in outs])
    torch.testing.assert_close(multi, single, rtol=1e-5, atol=1e-7)
    naive = torch.tensor(ref.sinkhorn(ref.to_lists(full), TEMP), dtype=torch.float32)
    torch.testing.assert_close(multi, naive, rtol=1e-5, atol=1e-7)
    # control: normalising each half on its own (no all-reduce) gives something else
    separate = torch.cat([sinkhorn_knopp(x, TEMP) for x in inputs[key]])
    assert (separate - single).abs().max().item() > 1e-3


@pytest.mark.parametrize("variant", ["explicit", "implicit"])
def test_sinkhorn_masked_tokens_unequal_counts(two_process_results, variant):
    inputs, outs = two_process_results
    assert [t.shape[0] for t in inputs["tokens"]] == [5, 9]
    full = torch.cat(inputs["tokens"])
    single = IBOTPatchLoss(K).sinkhorn_teacher(full, TEMP, full.shape[0])
    multi = torch.cat([o[f"sk_tokens_{variant}"] for o in outs])
    torch.testing.assert_close(multi, single, rtol=1e-5, atol=1e-7)
    naive = torch.tensor(ref.sinkhorn(ref.to_lists(full), TEMP), dtype=torch.float32)
    torch.testing.assert_close(multi, naive, rtol=1e-5, atol=1e-7)


def test_dino_center_is_the_global_mean_with_unequal_batches(two_process_results):
    inputs, outs = two_process_results
    local = inputs["center_logits"]
    assert [x.shape[0] // 2 for x in local] == [2, 3]
    # naive: every global-crop row of every process, one mean, momentum 0.9
    all_crops = [ref.to_lists(c) for x in local for c in x.chunk(2)]
    expected = torch.tensor([ref.center_ema(ref.to_lists(inputs["center0"])[0], all_crops, 0.9)], dtype=torch.float32)
    single = DINOLoss(K)
    single.center.copy_(inputs["center0"])
    single.update_center(torch.cat(local))
    for o in outs:
        torch.testing.assert_close(o["dino_center"], expected)
        torch.testing.assert_close(o["dino_center"], single.center)
    # control: averaging the two per-process means would weight the samples differently
    mean_of_means = torch.stack([x.mean(0) for x in local]).mean(0, keepdim=True)
    wrong = 0.9 * inputs["center0"] + 0.1 * mean_of_means
    assert (wrong - expected).abs().max().item() > 1e-3


def test_ibot_center_is_the_mean_over_all_masked_tokens(two_process_results):
    inputs, outs = two_process_results
    expected = ref.center_ema(ref.to_lists(inputs["center0"])[0], [ref.to_lists(t) for t in inputs["tokens"]], 0.9)
    for o in outs:
        torch.testing.assert_close(o["ibot_center"], torch.tensor([expected], dtype=torch.float32))
