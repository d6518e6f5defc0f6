"""Progress bars per stage on stderr (tqdm); ``quiet`` turns them into no-ops."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, totals: dict[str, int], quiet: bool = False) -> None:
        self._bars: dict[str, tqdm] = {}
        if quiet:
            return
        for position, (stage, total) in enumerate(totals.items()):
            self._bars[stage] = tqdm(
                total=total,
                desc=f"{stage:<10}",
                unit="req" if stage == "candidates" else "prompt",
                position=position,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def advance(self, stage: str, n: int = 1) -> None:
        bar = self._bars.get(stage)
        if bar is not None:
            bar.update(n)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
