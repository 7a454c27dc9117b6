"""GSM8K evaluation job: target-only (AR), vanilla SD and PEARL on the same prompts and draft/target pairs.

Runs three ways, with the same results:
    python jobs/eval_gsm8k.py --limit 20                       # starts a private local Ray if none runs
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/eval_gsm8k.py --limit 20 --out /abs/path    # joins the cluster it is submitted to
    make demo                                                  # the embedded default pair, a few questions

Options: ``--help``. The job itself lives in ``pearl_ray/evals/gsm8k_job.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"), ("TOKENIZERS_PARALLELISM", "false"),
                   ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):
    os.environ.setdefault(key, value)

from pearl_ray.evals.gsm8k_job import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
