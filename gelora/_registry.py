"""One registry mechanism for the engines of an operation (the kNN engines, the fused-LoRA backends):
declared, checked, explainable.

Every engine answers its reasons for a job; selection walks the registry's priority list and takes the
first engine with no reasons. A name passed by the caller (or the registry's environment variable)
forces one; it is still checked, and a forced engine that cannot run raises :class:`BackendUnavailable`
with its reasons. When nothing fits, the error lists every engine's reasons.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Dict, List, Optional, Sequence

from . import _env

log = logging.getLogger("gelora")


class BackendUnavailable(RuntimeError):
    """A requested backend cannot run on this input (or cannot do what was asked of it); the message
    lists why."""


class Registry:
    """Engines of one operation, by name, in priority order.

    Args:
        what: what the engines do, for messages ("kNN", "LoRA").
        priority: names in the order automatic selection tries them.
        modules: modules that register the engines when imported (imported on first use, so that
            optional dependencies are only touched then).
        env: the environment variable that forces an engine (read through :mod:`gelora._env`).
    """

    def __init__(self, what: str, priority: Sequence[str], modules: Sequence[str], env: str) -> None:
        self.what = what
        self.priority = tuple(priority)
        self.modules = tuple(modules)
        self.env = env
        self._engines: Dict[str, object] = {}
        self._logged: set = set()

    def register(self, engine):
        self._engines[engine.name] = engine
        return engine

    def all(self) -> Dict[str, object]:
        if not all(n in self._engines for n in self.priority):
            for m in self.modules:
                importlib.import_module(m)
        return {n: self._engines[n] for n in self.priority if n in self._engines}

    def get(self, name: str):
        engines = self.all()
        if name not in engines:
            raise ValueError(f"unknown {self.what} backend {name!r}; choose one of {sorted(engines)}")
        return engines[name]

    def select(self, reasons_of: Callable[[object, bool], List[str]], backend: Optional[str] = None):
        """The forced engine (``backend`` or the environment), else the first with no reasons;
        ``reasons_of(engine, forced)`` gives an engine's reasons for the job at hand.

        Raises:
            BackendUnavailable: the forced engine cannot do the job, or no engine can.
        """
        forced = backend or _env.text(self.env) or None
        if forced is not None:
            eng = self.get(forced)
            reasons = reasons_of(eng, True)
            if reasons:
                raise BackendUnavailable(f"{self.what} backend {forced!r} cannot run here: " + "; ".join(reasons))
            return eng
        skipped: Dict[str, List[str]] = {}
        for name, eng in self.all().items():
            reasons = reasons_of(eng, False)
            if not reasons:
                if skipped:
                    key = (name, tuple(skipped))
                    if key not in self._logged:
                        self._logged.add(key)
                        log.info("gelora: using %s backend %r (%s)", self.what, name,
                                 "; ".join(f"{k}: {v[0]}" for k, v in skipped.items()))
                return eng
            skipped[name] = reasons
        raise BackendUnavailable(
            f"no {self.what} backend can run on this input: "
            + " | ".join(f"{k}: {'; '.join(v)}" for k, v in skipped.items())
        )


