"""Test-only fault injection for subprocesses (tests/test_crash.py puts this folder on PYTHONPATH).

`VLHOOKS_TEST_FAULT` is a comma list of `what:kind:n[:seconds]`, acted on at the n-th write of `what`:
- `what`: `checkpoint` (a Lightning checkpoint: a safetensors file with `.ckpt` in its name), `adapter` (an adapter
  folder's weights, `adapter_model.safetensors`, also written under a temporary name), `cache` (a dataset cache's
  `Dataset.save_to_disk`), `feature` (a feature file of `vlhooks extract`);
- `kind`: `kill` (write the file, cut it to half its size, SIGKILL this process: a kill in the middle of the write),
  `killafter` (SIGKILL right after the write, before the writer renames it into place), `sleep` (sleep `seconds`
  after the write, before the writer renames it: widens that window; `n` 0 = every write).
Nothing happens without the variable. Written to be hit deterministically: no timing is involved in `kill`.
"""

import os
import signal
import time

_SPEC = os.environ.get("VLHOOKS_TEST_FAULT", "")
_FAULTS = []
for _item in filter(None, _SPEC.split(",")):
    _parts = _item.split(":")
    _FAULTS.append({"what": _parts[0], "kind": _parts[1], "n": int(_parts[2]),
                    "seconds": float(_parts[3]) if len(_parts) > 3 else 0.0, "count": 0})


def _matching(what: str):
    for f in _FAULTS:
        if f["what"] == what:
            f["count"] += 1
            if f["n"] in (0, f["count"]):
                yield f


def _act(what: str, path: str, write):
    faults = list(_matching(what))
    out = write()
    for f in faults:
        if f["kind"] == "sleep":
            time.sleep(f["seconds"])
        if f["kind"] == "kill":
            if os.path.isfile(path):
                with open(path, "r+b") as fh:
                    fh.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        if f["kind"] == "killafter":
            os.kill(os.getpid(), signal.SIGKILL)
    return out


if _FAULTS:
    import safetensors.torch as _st

    _real_save_file = _st.save_file

    def save_file(tensors, filename, metadata=None):
        name = os.path.basename(str(filename))
        what = ("checkpoint" if ".ckpt" in name else "adapter" if name.startswith("adapter_model")
                or name.startswith(".adapter_model") else "feature" if ".safetensors" in name else None)
        write = lambda: _real_save_file(tensors, filename, metadata=metadata)  # noqa: E731
        return _act(what, str(filename), write) if what else write()

    _st.save_file = save_file

    if any(f["what"] == "cache" for f in _FAULTS):
        import datasets as _datasets

        _real_save_to_disk = _datasets.Dataset.save_to_disk

        def save_to_disk(self, dataset_path, *args, **kwargs):
            return _act("cache", str(dataset_path), lambda: _real_save_to_disk(self, dataset_path, *args, **kwargs))

        _datasets.Dataset.save_to_disk = save_to_disk
