"""Stopping a run on a non-finite loss, with or without a host synchronisation every step.

``finite_check`` (a top-level config key) chooses when the host reads the loss:

``every_step``
    The step's total is read before its backward pass: a non-finite loss stops the run at its
    own step, before any optimizer step has used it, so the crash checkpoint holds the weights
    just before it. On an accelerator the host waits for the forward pass every step, so it
    cannot queue the backward pass ahead.
``logging_interval``
    Every step records on the device, without waiting, the first step whose total was not
    finite and its terms' values. The host reads that record every ``trainer.log_every_n_steps``
    steps, before every checkpoint is written and at the end of training. A non-finite loss then
    stops the run up to ``log_every_n_steps - 1`` steps late, with weights that have taken the
    steps since (a non-finite gradient makes them non-finite): no checkpoint is written from
    them, and the newest one on disk predates the bad step (each save reads the record first).
``auto`` (the default)
    ``every_step`` on the CPU, where the read costs nothing; ``logging_interval`` elsewhere.
"""
from __future__ import annotations

import math

import torch

from ssl_vit.losses.checks import NonFiniteLossError, check_finite

FINITE_CHECKS = ("auto", "every_step", "logging_interval")


class FiniteLossChecks:
    """LightningModule mixin: ``checked_total`` sums and logs the loss terms and stops the run
    on a non-finite loss as ``finite_check`` says. A method whose ``on_save_checkpoint`` it
    overrides calls ``raise_if_nonfinite_seen`` first."""

    finite_check: str = "auto"  # build_method sets the config's value
    _nonfinite_record: tuple[list[str], torch.Tensor, torch.Tensor] | None = None

    def reads_loss_every_step(self) -> bool:
        if self.finite_check not in FINITE_CHECKS:
            raise ValueError(f"finite_check must be one of {FINITE_CHECKS}, got {self.finite_check!r}")
        return self.finite_check == "every_step" or (self.finite_check == "auto" and self.device.type == "cpu")

    def checked_total(self, weighted_terms: dict[str, tuple[float, torch.Tensor]]) -> torch.Tensor:
        """Weighted sum of the loss terms (each logged as ``loss/TERM``, the sum as ``loss``); a
        non-finite term or sum stops the run, naming term and step."""
        total = 0.0
        for term, (weight, value) in weighted_terms.items():
            self.log(f"loss/{term}", value.detach(), on_step=True)
            total = total + weight * value
        if self.reads_loss_every_step():
            # One host synchronisation, on the total; the terms are read only when it is not finite.
            if not bool(torch.isfinite(total.detach())):
                for term, (_, value) in weighted_terms.items():
                    check_finite(term, value.detach(), self.global_step)
                check_finite("total", total.detach(), self.global_step)  # finite terms, a non-finite sum
        else:
            self.record_if_nonfinite([*weighted_terms, "total"],
                                     [value for _, value in weighted_terms.values()] + [total])
        # Shown by the progress bar on the logging interval (callbacks/progress.py): a prog_bar
        # value would be read on the host every step.
        self.log("loss", total.detach(), on_step=True)
        return total

    @torch.no_grad()
    def record_if_nonfinite(self, names: list[str], values: list[torch.Tensor]) -> None:
        """Keep, on the device, the first step whose last value (the total) is not finite, with
        all the values of that step (each summed: a non-finite element keeps the sum non-finite)."""
        values = torch.stack([v.detach().float().sum() for v in values])
        if self._nonfinite_record is None:
            self._nonfinite_record = (names, torch.full((), -1, dtype=torch.long, device=values.device),
                                      torch.zeros_like(values))
        _, first_step, first_values = self._nonfinite_record
        first = (first_step < 0) & ~torch.isfinite(values[-1])
        first_step.copy_(torch.where(first, self.global_step, first_step))
        first_values.copy_(torch.where(first, values, first_values))

    def raise_if_nonfinite_seen(self) -> None:
        """Read the device's record (one host synchronisation); raise ``NonFiniteLossError``
        naming the first non-finite term and its step if a step recorded one."""
        if self._nonfinite_record is None:
            return
        names, first_step, first_values = self._nonfinite_record
        step = int(first_step)
        if step < 0:
            return
        term, value = next((n, v) for n, v in zip(names, first_values.tolist()) if not math.isfinite(v))
        raise NonFiniteLossError(
            f"non-finite {term} loss ({value}) at step {step}, found by the check at step "
            f"{self.global_step} (finite_check={self.finite_check} reads the losses every "
            f"trainer.log_every_n_steps={self.trainer.log_every_n_steps} steps and before each checkpoint; "
            "finite_check=every_step stops at the bad step itself). The weights in memory took the steps since, "
            "so no checkpoint was written from them: the newest checkpoint predates the bad step.",
            weights_spoilt=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._nonfinite_record is not None and self.global_step % self.trainer.log_every_n_steps == 0:
            self.raise_if_nonfinite_seen()

    def on_train_end(self) -> None:
        self.raise_if_nonfinite_seen()
