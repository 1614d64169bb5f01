"""``python -m step_hook_main ARGS``: ``mmebm train ARGS`` with a step hook that acts at an exact step.

``MMEBM_TEST_HOOK=STEP:RANK:ACTION``: after optimizer step STEP, rank RANK sends itself ACTION (``SIGTERM``,
``SIGUSR1``, ``SIGINT``) or, for ``freeze``, stops answering for 20 s; ``SIGNAL+again`` also sends SIGTERM
and SIGINT again while the stop checkpoint is being written. Exact steps instead of sleeps make the tests
deterministic.
"""

import os
import runpy
import signal
import time

from mmebm_dist.train.signals import STEP_HOOKS

step_at, rank_at, action = os.environ["MMEBM_TEST_HOOK"].split(":")


def _hook(step: int, model: object) -> None:
    if step != int(step_at) or int(os.environ.get("RANK", "0")) != int(rank_at):
        return
    if action == "freeze":
        time.sleep(20)  # longer than the tests' train.dist_timeout_s: rank 0 times out first
    else:
        name, _, again = action.partition("+")
        if again:
            import mmebm_dist.train.loop as loop

            save = loop.save_checkpoint

            def save_while_signalled(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                return save(*args, **kwargs)

            loop.save_checkpoint = save_while_signalled
        os.kill(os.getpid(), getattr(signal, name))


STEP_HOOKS.append(_hook)
runpy.run_module("mmebm_dist.train", run_name="__main__")
