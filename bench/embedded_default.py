"""Wall time of the embedded default (`caiforge run` with no flags: bundled prompts, constitution, local model).

Target (issue 11): under 90 s on 2 cores. Each case is a fresh process in a fresh folder (model load and the
judge's f16 copy included), so the figure is what `make run` costs after installation. Cases:

- ``threads=1`` / ``threads=2``: fixed llama.cpp thread counts (``--local-threads``);
- ``adaptive``: the default, threads follow the cores nobody else is using, call by call;
- ``... + busy``: the same while another process spins one core, as a second job on a shared machine does.

The event loop idles meanwhile: every llama.cpp call runs on one worker thread, so the CPU the run uses beyond
its wall time is llama.cpp's second thread, not the loop. Run alone on the machine.

    .venv/bin/python bench/embedded_default.py [--cases threads=1,threads=2,adaptive,adaptive+busy,threads=2+busy]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("threads=1", "threads=2", "adaptive", "adaptive+busy", "threads=2+busy")
SPIN = "import time\nend = time.monotonic() + 900\nwhile time.monotonic() < end: pass\n"


def run_case(case: str) -> dict[str, object]:
    base, _, busy = case.partition("+")
    args = [sys.executable, "-m", "caiforge", "run"]
    if base.startswith("threads="):
        args += ["--local-threads", base.split("=", 1)[1]]
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(args, cwd=tmp, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            manifest = json.loads((Path(tmp) / "caiforge-out" / "manifest.json").read_text())
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    kv = {role: manifest["endpoints"][role]["kv_cache"] for role in ("policy", "judge")}
    return {
        "case": case,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "pairs": manifest["counts"]["pairs"],
        "policy_model_s": kv["policy"]["seconds"],
        "judge_model_s": kv["judge"]["seconds"],
        "judge_reused_tokens": kv["judge"]["reused_tokens"],
        "judge_evaluated_tokens": kv["judge"]["evaluated_tokens"],
        "policy_batches": kv["policy"]["batches"],
        "threads_used": {role: kv[role]["threads"] for role in kv},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    cases = ap.parse_args().cases.split(",")
    for case in cases:
        print(json.dumps(run_case(case)), flush=True)


if __name__ == "__main__":
    main()
