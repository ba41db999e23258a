"""One rank of bench_erase_scaling.py: runs `mace cache` or `mace erase` work in this process and
writes its seconds per stage and peak memory to STATS/rank<R>.json.

    python benchmarks/_rank_probe.py STATS cache PROMPTS OUT DEVICE
    python benchmarks/_rank_probe.py STATS erase CONFIG
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    from mace import distributed
    from mace.utils.atomic import write_json_atomically

    stats, command, rest = Path(argv[0]), argv[1], argv[2:]
    if command == "cache":
        from mace.pipelines.loading import load_pipeline
        from mace.stages.cache import build_preservation_cache, read_prompt_file

        prompts, out, device = rest
        device = distributed.local_device(device)
        distributed.init_from_env(device)
        start = time.perf_counter()
        pipe = load_pipeline("builtin:world", device=device)
        build_preservation_cache(pipe, read_prompt_file(prompts), out, model_id="builtin:world", progress=False)
        seconds = {"cache": time.perf_counter() - start}
    elif command == "erase":
        from mace.config import load_config
        from mace.erase import erase

        seconds = dict(erase(load_config(rest[0]), ("prepare", "refine", "train", "fuse"), progress=False).seconds)
    else:
        raise SystemExit(f"unknown command {command!r}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record = {"rank": distributed.rank(), "seconds": seconds, "peak_mb": round(peak_mb, 1)}
    if torch.cuda.is_available():
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # Default Triton kernels that failed and fell back to torch (op -> error): a GPU run
    # records whether its numbers came from the kernels.
    import mace_kernels

    record["triton_failures"] = mace_kernels.triton_failures()
    write_json_atomically(stats / f"rank{distributed.rank()}.json", record)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
