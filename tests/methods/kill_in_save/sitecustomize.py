"""Test hook, imported by Python at start-up when this folder is on PYTHONPATH: with
SSL_VIT_TEST_KILL_IN_SAVE_AT_STEP=N, the process dies by SIGKILL in the middle of writing its
checkpoint of step N (the temporary file holds half of the checkpoint and is never renamed),
which is what a kill during the write leaves behind."""
import os
import signal

_STEP = os.environ.get("SSL_VIT_TEST_KILL_IN_SAVE_AT_STEP")
if _STEP:
    import lightning.pytorch as pl

    _save = pl.Trainer.save_checkpoint

    def _save_then_die(self, filepath, *args, **kwargs):
        _save(self, filepath, *args, **kwargs)
        if self.global_step == int(_STEP) and str(filepath).endswith(".tmp"):
            os.truncate(filepath, os.path.getsize(filepath) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    pl.Trainer.save_checkpoint = _save_then_die
