"""Plan where Qwen2.5-Omni runs for a GPU memory budget (no GPU needed):

    python modeling_low_vram.py plan --model 3b --gpu-gib 8 [--json]    # 3b, 7b, a checkpoint or config.json

The entry point people already use; the planner is `qwen_omni_server.local.plan` (and the engine that loads
the model low on VRAM is `qwen_omni_server.local`).
"""

import sys

from qwen_omni_server.local.plan import main

if __name__ == "__main__":
    sys.exit(main())
