"""The backend registry: every module of this package that defines ``KINDS`` adds its server kinds.

The CLI's ``--policy-backend``/``--judge-backend`` choices, the inference of a kind from the flags given, each
kind's defaults and the "which model does what" line all come from here, so a new server kind is one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING, Any

from .base import Backend, Capabilities, Kind

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["Backend", "Capabilities", "Kind", "choices", "describe", "infer", "kind", "make", "make_all", "resolve"]


@cache
def _kinds() -> dict[str, Kind]:
    found: dict[str, Kind] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        for k in getattr(importlib.import_module(f"{__name__}.{module}"), "KINDS", ()):
            if k.name in found:
                raise RuntimeError(f"backend kind {k.name!r} is defined twice")
            found[k.name] = k
    return found


def choices(role: str) -> tuple[str, ...]:
    return tuple(name for name, k in _kinds().items() if role in k.roles)


def kind(name: str, role: str) -> Kind:
    k = _kinds().get(name)
    if k is None or role not in k.roles:
        raise ValueError(f"unknown {role} backend {name!r}; choose one of {', '.join(choices(role))}")
    return k


def infer(role: str, section: Any) -> str:
    """The kind a role's settings point at when none is named (a URL, a host, a key, else the local model)."""
    candidates = sorted((k for k in _kinds().values() if role in k.roles), key=lambda k: -k.priority)
    return next(k.name for k in candidates if k.infer(section))


def resolve(role: str, section: Any) -> Any:
    """The role's settings with its kind named and that kind's defaults filled in."""
    name = section.backend or infer(role, section)
    return kind(name, role).resolve(section.model_copy(update={"backend": name}))


def make(cfg: RunConfig, role: str) -> Backend:
    """The role's (first) endpoint."""
    section = getattr(cfg, role)
    return kind(section.backend, role).make(cfg, role)


def _addresses(section: Any) -> list[dict[str, Any]]:
    """One settings update per endpoint: NeMo's ``servers`` (host:port), else the ``urls``."""
    servers = getattr(section, "servers", ())
    if len(servers) > 1:
        return [{"host": h, "port": int(p)} for h, _, p in (s.rpartition(":") for s in servers)]
    urls = getattr(section, "urls", ())
    if len(urls) > 1:
        return [{"url": u} for u in urls]
    return [{}]


def make_all(cfg: RunConfig, role: str) -> list[Backend]:
    """One backend per endpoint of the role, each built as if it were the only one."""
    section = getattr(cfg, role)
    k = kind(section.backend, role)
    return [k.make(cfg.model_copy(update={role: section.model_copy(update=u)}), role) for u in _addresses(section)]


def describe(cfg: RunConfig, role: str) -> str:
    section = getattr(cfg, role)
    text = kind(section.backend, role).where(cfg, role)
    more = len(_addresses(section)) - 1
    return text + (f" and {more} more endpoint(s)" if more else "")
