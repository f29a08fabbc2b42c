"""What ``benchmarks/step_speed.py`` times: the ssl_vit Trainer step alternating with the lightly-built
step, the bare backbones against timm's, and the machine's matrix-product ceiling."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import lightning as L
import torch

import train_step  # the bare ssl_vit step (no Trainer); these are sibling benchmark scripts
from backbone import forward_flops
from flops import count_flops, flop_counter, flops_by_op  # FLOP counting with the CPU attention kernels registered
from lightly_dinov2 import LightlyDINOv2, timm_vit  # the lightly-built DINOv2 step
from step_speed_report import PrecisionResult, Timing


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def param_checksums(module: torch.nn.Module) -> list[float]:
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in module.parameters()]


def changed_fraction(before: list[float], after: list[float]) -> float:
    return sum(b != a for b, a in zip(before, after)) / max(len(before), 1)


class InMemoryBatches(torch.utils.data.Dataset):
    """``length`` items cycling over pre-collated batches (a DataLoader with batch_size=None)."""

    def __init__(self, batches: list[dict], length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batches[index % len(self.batches)]


class Alternate(L.Callback):
    """First callback of the ssl_vit Trainer: before each of the first ``n`` Trainer steps it
    runs (and times) one reference step; it times each Trainer step from the end of that
    reference step to the start of the next batch's hooks. Step 0 of each side is run under a
    FLOP counter and not timed."""

    def __init__(self, reference: LightlyDINOv2, n: int):
        self.reference, self.n = reference, n
        self.ssl_s: list[float] = []
        self.ref_s: list[float] = []
        self.ssl_flops: dict[str, int] = {}
        self.ref_flops: dict[str, int] = {}
        self.last_ref_loss: torch.Tensor | None = None
        self.threads: int | None = None  # torch's thread count inside the Trainer's loop
        self._index = 0
        self._t0: float | None = None
        self._counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._t0 is not None:
            self.ssl_s.append(now - self._t0)
            self._t0 = None
        i = self._index
        self.threads = torch.get_num_threads()
        if i < self.n:
            if i == 0:
                self.ref_flops = count_flops(lambda: self.reference.step(batch))
            else:
                start = time.perf_counter()
                self.last_ref_loss = self.reference.step(batch)
                self.ref_s.append(time.perf_counter() - start)
            if i == 0:
                self._counter = flop_counter()
                self._counter.__enter__()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.ssl_flops = flops_by_op(self._counter)
            self._counter = None
        self._index += 1


def time_steps(cfg, datamodule, batches: list[dict], precision: str, warmup: int, steps: int,
               out_dir: str) -> PrecisionResult:
    """The ssl_vit Trainer and the lightly reference, alternating (see :class:`Alternate`)."""
    from lightning.pytorch.callbacks import ModelSummary

    from ssl_vit.build import build_method, build_trainer
    from ssl_vit.callbacks import LastCheckpoint

    bf16 = precision == "bf16"
    n = 1 + warmup + steps  # FLOP-counted + warm-up + timed, per side
    L.seed_everything(cfg.seed, verbose=False)
    method = build_method(cfg, datamodule)  # its schedules planned over the configured run
    reference = LightlyDINOv2(cfg, bf16)
    trainer_cfg = copy.deepcopy(cfg)
    trainer_cfg.trainer.max_steps = n + 1  # + 1 untimed step that closes the last interval
    trainer = build_trainer(trainer_cfg, Path(out_dir), datamodule, knn=False)
    # Out: the checkpoint callback (writes only at the end of these short fits) and the model summary (printed once).
    trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, (LastCheckpoint, ModelSummary))]
    alternate = Alternate(reference, n)
    trainer.callbacks.insert(0, alternate)
    loader = torch.utils.data.DataLoader(InMemoryBatches(batches, n + 1), batch_size=None, shuffle=False)

    before = {"ssl_vit student": param_checksums(method.student), "ssl_vit teacher": param_checksums(method.teacher),
              "lightly student": param_checksums(reference.student),
              "lightly teacher": param_checksums(reference.teacher)}
    trainer.fit(method, train_dataloaders=loader)
    if len(alternate.ssl_s) != n or len(alternate.ref_s) != n - 1:
        raise RuntimeError(f"the Trainer ran {len(alternate.ssl_s)} timed steps, expected {n}")
    if alternate.threads != torch.get_num_threads():  # both sides run in the Trainer's loop: a change hits both
        print(f"    note: torch used {alternate.threads} threads inside the Trainer, {torch.get_num_threads()} outside")
    after = {"ssl_vit student": param_checksums(method.student), "ssl_vit teacher": param_checksums(method.teacher),
             "lightly student": param_checksums(reference.student),
             "lightly teacher": param_checksums(reference.teacher)}
    last_ref = alternate.last_ref_loss
    losses = {"ssl_vit": float(trainer.callback_metrics.get("loss", float("nan"))),
              "lightly": float("nan") if last_ref is None else float(last_ref)}
    return PrecisionResult(
        precision,
        Timing("ssl_vit step (Trainer)", alternate.ssl_s[1 + warmup:], alternate.ssl_flops),
        Timing("lightly step (plain loop)", alternate.ref_s[warmup:], alternate.ref_flops),
        changed={k: changed_fraction(before[k], after[k]) for k in before},
        losses=losses,
    )


def unpruned_step_flops(cfg, datamodule, batch: dict, precision: str) -> dict[str, int]:
    """FLOPs by op of one bare ssl_vit step (``train_step.optimisation_step``) of ``cfg`` with
    ``model.prune_last_block=false`` and ``model.drop_path_law=bernoulli``: the work the peers do,
    for the FLOP agreement."""
    from ssl_vit.build import build_method

    unpruned = copy.deepcopy(cfg)
    unpruned.model.prune_last_block = False
    unpruned.model.drop_path_law = "bernoulli"  # every sample through every branch, as the peers compute it
    method = build_method(unpruned, datamodule)
    method.log = method.log_dict = lambda *args, **kwargs: None  # no Trainer attached
    optimizer = method.configure_optimizers()
    return count_flops(lambda: train_step.optimisation_step(method, optimizer, batch, 0, "cpu", precision == "bf16"))


def time_backbones(cfg, images: torch.Tensor, precision: str, warmup: int,
                   steps: int) -> tuple[Timing, Timing, Timing]:
    """Forward+backward of ssl_vit's VisionTransformer (every token through the last block, as
    timm), timm's, and ssl_vit's as shipped (the [CLS] output computed with the last block
    pruned), alternating."""
    from ssl_vit.config import build_backbone_from_config

    bf16 = precision == "bf16"
    torch.manual_seed(cfg.seed)
    # The architecture timm ships at this size: no LayerScale, no drop path.
    plain = copy.deepcopy(cfg.model)
    plain.init_values, plain.drop_path_rate = None, 0.0
    ours = build_backbone_from_config(plain).train()
    ours.set_attention_kernel(cfg.model.attention)  # as the training run sets it
    ours.set_last_block_pruning(False)  # timm's work: every token through the last block
    shipped = copy.deepcopy(ours)
    shipped.set_last_block_pruning(True)
    nets = {"ssl_vit backbone fwd+bwd": ours, "timm backbone fwd+bwd": timm_vit(cfg.model).train(),
            "ssl_vit backbone, pruned": shipped}

    def step(net) -> None:
        net.zero_grad(set_to_none=True)
        with autocast(bf16):
            out = net(images)
        out.float().square().mean().backward()

    flops = {label: count_flops(lambda net=net: step(net)) for label, net in nets.items()}
    times: dict[str, list[float]] = {label: [] for label in nets}
    for i in range(warmup + steps):
        for label, net in nets.items():
            start = time.perf_counter()
            step(net)
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    return tuple(Timing(label, times[label], flops[label]) for label in nets)  # type: ignore[return-value]


def analytic_backbone_flops(model_cfg, images: int) -> float:
    """3x the forward FLOPs of the blocks (``forward_flops`` of benchmarks/backbone.py)."""
    tokens = 1 + (model_cfg.img_size // model_cfg.patch_size) ** 2 + model_cfg.num_register_tokens
    hidden = int(model_cfg.embed_dim * model_cfg.mlp_ratio)
    return 3 * images * forward_flops(model_cfg.depth, model_cfg.embed_dim, tokens, hidden)


def matmul_ceiling(n: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of the best of ``repeats`` n x n x n products (after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
