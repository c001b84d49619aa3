"""Progress bars for the shell (tqdm on stderr), or a silent stand-in when they are off."""

from __future__ import annotations


class _Silent:
    """The interface of a tqdm bar that the shell uses, doing nothing."""

    def update(self, n: int = 1) -> None:
        del n

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar of ``total`` ``unit``s labelled ``desc`` (cleared when closed), or a silent one."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
