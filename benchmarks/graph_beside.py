"""PatchCore's graph built beside the search check, against built at once (as before session 24): the whole fit
with its check (``train_detector``), then the line's updates (fit on the first 20 %, steps of 10 %), each timed
both ways, alternated, and the two fitted states compared tensor for tensor.

    python benchmarks/graph_beside.py --data mvtec --root ../shared/data/magnetic-tile
    python benchmarks/graph_beside.py --data mvtec --root ../shared/data/kolektorsdd --no-updates
    python benchmarks/graph_beside.py --data folder:normal=../shared/data/elpv/normal,abnormal=../shared/data/elpv/abnormal,name=elpv --no-updates

"At once" builds the graph as soon as the bank is kept (``IndexedBank._index`` followed by ``_graph_built``),
before the check's held-out patches are searched exactly; "beside" is adkit's default. PatchCore's defaults; the
fits at --precision fp32, the updates at the precision the fit's check chose (as adkit update runs). An update
step runs from the same state both ways (a copy each) and the line goes on from the "beside" one. Prints one
line per run.
"""

from __future__ import annotations

from paired import Ways, arguments, fits, line, setting

from adkit_plugins.patchcore.index import IndexedBank

BESIDE = IndexedBank._index


def at_once(self, *args, **kwargs) -> None:
    BESIDE(self, *args, **kwargs)
    self._graph_built()


def switch(index) -> None:
    IndexedBank._index = index


WAYS: Ways = {"graph built at once": lambda: switch(at_once), "graph built beside": lambda: switch(BESIDE)}


def main() -> None:
    args = arguments(__doc__).parse_args()
    if args.fits:
        fits(setting(args, "fp32"), WAYS, args.fits)
    if not args.no_updates:
        line(setting(args, "auto"), WAYS, "graph built beside")
    switch(BESIDE)


if __name__ == "__main__":
    main()
