"""Two real CPU processes (gloo): Sinkhorn-Knopp and the DINO center over processes equal one
process holding the concatenated batch; the iBOT center averages the per-process means.

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
        token_weighted = IBOTPatchLoss(K, center_reduction="sample_mean")
        token_weighted.center.copy_(inp["center0"])
        token_weighted.update_center(inp["tokens"][rank])
        out["ibot_center_sample_mean"] = token_weighted.center.clone()
        # Gradient accumulation: the tokens arrive in two micro-batches, one update per step.
        split = IBOTPatchLoss(K)
        split.center.copy_(inp["center0"])
        for part in inp["tokens"][rank].chunk(2):
            split.accumulate_center(part)
        out["ibot_center_accumulated"] = split.center.clone()
        split.apply_center_update()
        out["ibot_center_after_apply"] = split.center.clone()
        # A process without masked tokens this step is left out of the average.
        lonely = IBOTPatchLoss(K)
        lonely.center.copy_(inp["center0"])
        lonely.update_center(inp["tokens"][rank] if rank == 0 else torch.zeros(0, K))
        out["ibot_center_one_empty"] = lonely.center.clone()
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


def _naive_mean(rows):
    return [sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))]


def test_ibot_center_is_the_average_of_per_process_means(two_process_results):
    """DINOv2's rule: each process averages its own masked tokens (5 and 9 here), the batch center
    is the plain mean of those two means; not the mean over all 14 tokens."""
    inputs, outs = two_process_results
    c0 = ref.to_lists(inputs["center0"])[0]
    means = [_naive_mean(ref.to_lists(t)) for t in inputs["tokens"]]
    batch_center = [(means[0][k] + means[1][k]) / 2 for k in range(K)]
    expected = torch.tensor([[0.9 * c0[k] + 0.1 * batch_center[k] for k in range(K)]])
    token_weighted = torch.tensor([ref.center_ema(c0, [ref.to_lists(t) for t in inputs["tokens"]], 0.9)])
    assert (expected - token_weighted).abs().max().item() > 1e-3  # the two rules differ on these inputs
    for o in outs:
        torch.testing.assert_close(o["ibot_center"], expected)
        # the token-weighted mean stays available as an option
        torch.testing.assert_close(o["ibot_center_sample_mean"], token_weighted)


def test_ibot_center_accumulates_micro_batches_into_one_update(two_process_results):
    inputs, outs = two_process_results
    for o in outs:
        assert torch.equal(o["ibot_center_accumulated"], inputs["center0"])  # nothing applied yet
        torch.testing.assert_close(o["ibot_center_after_apply"], o["ibot_center"])


def test_ibot_center_leaves_out_a_process_without_masked_tokens(two_process_results):
    inputs, outs = two_process_results
    c0 = ref.to_lists(inputs["center0"])[0]
    mean0 = _naive_mean(ref.to_lists(inputs["tokens"][0]))
    expected = torch.tensor([[0.9 * c0[k] + 0.1 * mean0[k] for k in range(K)]])
    for o in outs:
        torch.testing.assert_close(o["ibot_center_one_empty"], expected)
