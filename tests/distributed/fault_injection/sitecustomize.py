"""Test-only fault injection, active when ZEROVL_FAULT_KILL="<rank>:<step>" is set.

Put this directory on PYTHONPATH and the given rank SIGKILLs itself in the middle of saving the
checkpoint of that step: after DeepSpeed wrote its shard, before zerovl's own files and the
COMPLETE marker. Production code carries no hook for this.
"""

import os

_spec = os.environ.get("ZEROVL_FAULT_KILL")
if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
    import signal

    import torch

    _target = f"step_{int(_spec.split(':')[1]):08d}"
    _save = torch.save

    def _save_or_die(obj, f, *args, **kwargs):
        if _target in str(f) and "zerovl_rank" in str(f):
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(obj, f, *args, **kwargs)

    torch.save = _save_or_die
