"""Static routes from a TOML file, reloaded when it changes; a bad file keeps the old routes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from edgeproxy.control.providers import Observations
from edgeproxy.core.logs import get_logger
from edgeproxy.routes.labels import LabelError, LabelsInvalid, build_routing, parse_options
from edgeproxy.routes.model import Upstream
from edgeproxy.routes.table import FileRoute

T = TypeVar("T")
_CONTAINER_ONLY = ("port", "network", "enable", "weight")
_DEFAULT_PORTS = {"http": 80, "https": 443, "h2c": 80, "h2": 443}


class RoutesFileError(ValueError):
    """The routes file cannot be used; the message names the route, key and problem."""


def _as_label_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_as_label_value(v) for v in value)
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ValueError(f"unsupported value {value!r}")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """[routes.x.health] path = ... -> {"health.path": ...}: TOML tables as dotted keys.

    Raises KeyError(key) when a key is given twice (quoted "health.path" and a health table)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and not (prefix == "" and key == "upstreams"):
            items = _flatten(value, f"{prefix}{key}.").items()
        else:
            items = ((prefix + key, value),)  # type: ignore[assignment]
        for k, v in items:
            if k in out:
                raise KeyError(k)
            out[k] = v
    return out


def parse_upstream(url_text: str) -> Upstream:
    """'http://127.0.0.1:9001' -> Upstream; raise ValueError why not."""
    try:
        url = URL(url_text)
    except (ValueError, TypeError):
        raise ValueError(f"{url_text!r} is not a URL") from None
    if url.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{url_text!r}: the scheme must be http, https, h2c or h2")
    if not url.host:
        raise ValueError(f"{url_text!r}: no host")
    if url.raw_path not in ("", "/") or url.raw_query_string or url.fragment:
        raise ValueError(f"{url_text!r}: give scheme://host:port only, no path or query")
    port = url.port or _DEFAULT_PORTS[url.scheme]
    return Upstream(url.scheme, url.host, port, url_text)


def parse_routes(doc: Mapping[str, Any]) -> list[FileRoute]:
    """A parsed TOML document -> FileRoutes; raise RoutesFileError listing every problem."""
    out, invalid = parse_routes_each(doc)
    if invalid:
        raise RoutesFileError(str(LabelsInvalid([e for errs in invalid.values() for e in errs])))
    return out


def parse_routes_each(doc: Mapping[str, Any]) -> tuple[list[FileRoute], dict[str, list[LabelError]]]:
    """A parsed TOML document -> (valid FileRoutes, invalid route name -> its problems).

    As for labels, one bad route costs that route only; RoutesFileError only for a file whose
    shape is wrong (unknown top-level keys, `routes` not a table)."""
    unknown = set(doc) - {"routes"}
    if unknown:
        raise RoutesFileError(f"unknown top-level keys {sorted(unknown)}; expected [routes.NAME]")
    routes = doc.get("routes", {})
    if not isinstance(routes, dict):
        raise RoutesFileError("'routes' must be a table of [routes.NAME] tables")
    out: list[FileRoute] = []
    invalid: dict[str, list[LabelError]] = {}
    for name, table in sorted(routes.items()):
        errors = invalid.setdefault(name, [])
        if not isinstance(table, dict):
            errors.append(LabelError(f"routes.{name}", str(table), "must be a table"))
            continue
        options: dict[str, str] = {}
        upstreams: list[Upstream] = []
        raw_ups = table.get("upstreams")
        if not isinstance(raw_ups, list) or not raw_ups:
            errors.append(LabelError(f"routes.{name}.upstreams", str(raw_ups),
                                     "a non-empty list of URLs such as ['http://127.0.0.1:9001']"))
        else:
            for u in raw_ups:
                try:
                    upstreams.append(parse_upstream(str(u)))
                except ValueError as exc:
                    errors.append(LabelError(f"routes.{name}.upstreams", str(u), str(exc)))
        try:
            flat = _flatten(table)
        except KeyError as exc:
            errors.append(LabelError(f"routes.{name}.{exc.args[0]}", "",
                                     "given twice (as a quoted key and inside a table)"))
            continue
        for key, value in flat.items():
            if key == "upstreams":
                continue
            if key in _CONTAINER_ONLY:
                errors.append(LabelError(f"routes.{name}.{key}", str(value),
                                         "only meaningful on containers"))
                continue
            try:
                options[key] = _as_label_value(value)
            except ValueError as exc:
                errors.append(LabelError(f"routes.{name}.{key}", str(value), str(exc)))
        values, errs = parse_options(options, lambda k, n=name: f"routes.{n}.{k}")  # type: ignore[misc]
        schemes = {u.scheme for u in upstreams}
        if len(schemes) > 1:
            errors.append(LabelError(f"routes.{name}.upstreams", str(raw_ups),
                                     "all upstreams of a route must use the same scheme"))
        elif "scheme" in values and schemes - {"http", str(values["scheme"])}:
            # `scheme` applies to http:// URLs; a URL naming another scheme contradicts it.
            errors.append(LabelError(f"routes.{name}.scheme", str(values["scheme"]),
                                     f"the upstream URLs say {sorted(schemes)[0]}; give http:// "
                                     "URLs with scheme, or the scheme in the URLs"))
        elif "scheme" in values:
            upstreams = [dataclasses.replace(u, scheme=str(values["scheme"])) for u in upstreams]
        elif schemes and schemes != {"http"}:
            values["scheme"] = next(iter(schemes))  # from the URLs: tls.* keys then apply
        errors.extend(errs)
        if "path" not in table and "host" not in table:
            errors.append(LabelError(f"routes.{name}.path", "", "missing: give path or host"))
        if errs or not upstreams or ("path" not in values and "host" not in values):
            continue
        try:
            routing = build_routing(values, lambda k, n=name: f"routes.{n}.{k}",  # type: ignore[misc]
                                    options)
        except LabelsInvalid as exc:
            errors.extend(exc.errors)
            continue
        if not errors:
            out.append(FileRoute(name, routing.spec, tuple(upstreams)))
    return out, {name: errs for name, errs in invalid.items() if errs}


def load_routes_file(path: Path) -> list[FileRoute]:
    """Read and parse the routes file; raise RoutesFileError for any problem in it."""
    return _load(path, parse_routes)


def load_routes_each(path: Path) -> tuple[list[FileRoute], dict[str, list[LabelError]]]:
    """Read the routes file: (valid routes, invalid route name -> its problems)."""
    return _load(path, parse_routes_each)


def _load(path: Path, parse: Callable[[Mapping[str, Any]], T]) -> T:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise RoutesFileError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RoutesFileError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise RoutesFileError(f"{path} is not UTF-8 text") from None
    try:
        return parse(doc)
    except RoutesFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad file keeps the previous routes, always
        raise RoutesFileError(f"{path}: {type(exc).__name__}: {exc}"[:500]) from None


class FileProvider:
    """Polls the routes file's metadata and reloads it when it changes."""

    def __init__(self, sink: Observations, path: Path, interval: float, *,
                 quiet: bool = False) -> None:
        self._sink = sink
        self._path = path
        self._interval = interval
        self._log = get_logger("routes_file")
        # Every worker reads the file; one of them (quiet=False) reports on it.
        self._quiet = quiet
        self._seen: tuple[int, int, int] | None = None
        self._last_good: dict[str, FileRoute] = {}  # by name: what a route that turns invalid keeps

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load_once(self) -> None:
        """Load the file now if it changed since the last look."""
        stamp = self._stamp()
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            routes, invalid = load_routes_each(self._path)
        except RoutesFileError as exc:
            self._say("error", "routes_file_invalid", path=str(self._path), error=str(exc),
                      kept_previous=True)
            return
        good = {r.name: r for r in routes}
        for name, errors in invalid.items():
            last = self._last_good.get(name)
            reason = str(LabelsInvalid(errors))
            if last is not None:
                # A typo in a reload must not take a working route down: keep the last version.
                good[name] = dataclasses.replace(last, errors=tuple(errors))
                self._say("error", "routes_file_route_invalid", path=str(self._path), route=name,
                          error=reason, kept_previous=True)
            else:
                good[name] = FileRoute.invalid(name, tuple(errors))
                self._say("error", "routes_file_route_invalid", path=str(self._path), route=name,
                          error=reason, kept_previous=False)
        self._last_good = {r.name: r for r in routes} | {
            n: self._last_good[n] for n in invalid if n in self._last_good}
        self._sink.set_file_routes([good[n] for n in sorted(good)])
        self._say("info", "routes_file_loaded", path=str(self._path), routes=len(routes),
                  invalid=sorted(invalid) or None)

    def _say(self, level: str, event: str, **fields: Any) -> None:
        getattr(self._log, "debug" if self._quiet else level)(event, **fields)

    async def run(self) -> None:
        """Reload on change until cancelled."""
        while True:
            self.load_once()
            await asyncio.sleep(self._interval)
