"""A merge that stops in the middle of saving, for test_merge's kill test.

    python tests/merge_victim.py BASE ADAPTER OUT MARKER

Runs build_merged(BASE + ADAPTER -> OUT).  Every progress message is appended to MARKER.
The first weight file save_pretrained writes is written for real, then "mid-save" is appended
to MARKER and the process sleeps: the test kills it there with SIGKILL, while the temp
directory holds a partial checkpoint, as an OOM kill near 100 % would leave it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    base, adapter, out, marker = (Path(a) for a in sys.argv[1:5])

    def note(message: str) -> None:
        with marker.open("a", encoding="utf-8") as fh:
            fh.write(message + "\n")

    import transformers.modeling_utils as modeling_utils

    real_save = getattr(modeling_utils, "safe_save_file")

    def save_then_hang(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)
        note("mid-save")
        time.sleep(600)

    setattr(modeling_utils, "safe_save_file", save_then_hang)

    from pytest_llmmerge.merge import MergeSpec, build_merged

    build_merged(MergeSpec(base, (adapter,)), out, progress=note)
    note("finished")  # never reached when the test kills us


if __name__ == "__main__":
    main()
