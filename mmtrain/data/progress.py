"""Progress bars of the commands a user waits on (prepare, prepare-pairs, eval-lm, eval-retrieval,
frozen-retrieval): one rule for all of them.

A bar is drawn (tqdm, on stderr) only when it is wanted (no ``--quiet``), stderr is a terminal and
this process is rank 0 (``RANK`` unset or 0); otherwise :func:`progress_bar` returns a
:class:`NullBar` with the same interface that prints nothing. Redirected output (logs, CI, pipes)
therefore never fills with carriage-return noise, and only one rank of a launched job draws.

Lives in :mod:`mmtrain.data` (the lowest layer that uses it) so that data, export and eval
commands can all import it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Iterator, Optional


def is_rank_zero() -> bool:
    """True unless the launcher's ``RANK`` names another rank than 0."""
    rank = os.environ.get("RANK", "").strip()
    return rank in ("", "0")


def stderr_is_tty(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed file
        return False


def show_progress(enabled: bool = True) -> bool:
    """Whether a bar asked for (``enabled``) is drawn: stderr is a terminal and this is rank 0."""
    return bool(enabled) and is_rank_zero() and stderr_is_tty()


class NullBar:
    """What :func:`progress_bar` returns when no bar is drawn: tqdm's interface, doing nothing
    (iterating it iterates the wrapped iterable; ``n`` still counts the updates)."""

    disable = True

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 **_: Any):
        self.iterable, self.total, self.n = iterable, total, 0
        self.desc, self.postfix = desc or "", None

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            self.n += 1
            yield item

    def __len__(self) -> int:
        if self.total is not None:
            return int(self.total)
        return len(self.iterable) if self.iterable is not None else 0

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = kwargs or ordered_dict

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    set_description_str = set_description

    def reset(self, total: Optional[float] = None) -> None:
        self.n = 0
        if total is not None:
            self.total = total

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        pass

    def clear(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(s: str, file: Any = None, end: str = "\n", nolock: bool = False) -> None:
        """Like ``tqdm.write``: the text is printed (to stdout unless ``file``), bar or not."""
        print(s, file=file if file is not None else sys.stdout, end=end)


def progress_bar(enabled: bool = True, iterable: Optional[Iterable] = None, **kwargs: Any):
    """A tqdm bar on stderr when :func:`show_progress` (``enabled``, a terminal, rank 0), else a
    :class:`NullBar`. ``kwargs`` go to tqdm (desc, total, unit, position, leave, ...).

    Use it as a context manager (or call ``close()``), like tqdm::

        with progress_bar(not quiet, desc="tokenizing", total=n, unit=" docs") as bar:
            for ...: bar.update(1)
    """
    if not show_progress(enabled):
        return NullBar(iterable, **kwargs)
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)


def add_quiet_argument(parser) -> None:
    """The ``--quiet`` flag every long-running command shares."""
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they are shown only on a terminal, by rank 0)")
