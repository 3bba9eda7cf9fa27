"""The web console: server-rendered HTML pages over the same facade as the JSON API.

Every page is complete without JavaScript (the device table holds each device id, so
``chromium --dump-dom`` and a text browser see the fleet); ``console/console.js`` adds what must
move: rollout progress polled every second from ``/api/v1/rollouts/{id}``, and plots drawn as inline
SVG from ``/api/v1/telemetry``. Markup is built by small functions and ``string.Template`` over
``console/page.html``; every value from the fleet goes through :func:`html.escape`. Pages send a
Content-Security-Policy that allows only this origin's script and style (progress bars are SVG
attributes, not inline styles), so a device id crafted as markup cannot run anything.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from edge_agent.errors import UsageError
from packager.control.api import GUARD, call, find_deployment, page_of_devices, select
from packager.control.tokens import SESSION_COOKIE

__all__ = ["add_console_routes", "error_page", "progress_bar"]

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
PAGE_SIZE = 500  # devices per page of the table: a page stays small at 100,000 devices
_NAV = (("/", "Devices"), ("/deployments", "Deployments"), ("/rollouts", "Rollouts"), ("/events", "Events"))
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_EXAMPLE_CONDITION = "tags.site = 'milan' AND profile = 'cpu-arm64'"
_STATIC = {"console.js": "application/javascript", "console.css": "text/css"}


_PAGE = Template((CONSOLE_DIR / "page.html").read_text(encoding="utf-8"))


# --- small markup helpers --------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """Escaped text; None shows as a dash."""
    return "–" if value is None or value == "" else html.escape(str(value), quote=True)


def attr(value: Any) -> str:
    """A value for an attribute (None is empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


def link(href: str, text: Any) -> str:
    """An ``<a>`` with escaped text."""
    return f'<a href="{html.escape(href, quote=True)}">{esc(text)}</a>'


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def when(ts: Any, now: float | None = None) -> str:
    """A ``<time>`` element: how long ago, with the UTC time as its title."""
    if not isinstance(ts, int | float):
        return "–"
    age = max(0.0, (now or time.time()) - ts)
    for unit, seconds in (("d", 86400), ("h", 3600), ("min", 60)):
        if age >= seconds:
            text = f"{age / seconds:.0f} {unit} ago"
            break
    else:
        text = f"{age:.0f} s ago"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return f'<time datetime="{stamp}" title="{stamp}" data-ts="{ts:.3f}">{text}</time>'


def progress_bar(succeeded: int, failed: int, total: int, field: str = "") -> str:
    """An SVG bar: succeeded (green) then failed (red) out of ``total``; console.js resizes it live."""
    total = max(total, 1)
    ok, bad = 100.0 * succeeded / total, 100.0 * failed / total
    attr = f' data-bar="{esc(field)}"' if field else ""
    return (f'<svg class="bar" viewBox="0 0 100 8" preserveAspectRatio="none" role="img"{attr} '
            f'aria-label="{succeeded} succeeded, {failed} failed of {total}">'
            f'<rect class="track" width="100" height="8"/><rect class="ok" width="{ok:.2f}" height="8"/>'
            f'<rect class="bad" x="{ok:.2f}" width="{bad:.2f}" height="8"/></svg>')


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "nothing yet",
          attrs: str = "") -> str:
    """A table of pre-rendered cells (headers are markup too, so they may be sort links)."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td class="empty" colspan="{len(headers)}">{esc(empty)}</td></tr>'
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _dl(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _tags(tags: Any) -> str:
    if not isinstance(tags, dict) or not tags:
        return "–"
    return " ".join(f'<span class="tag">{esc(k)}={esc(v)}</span>' for k, v in sorted(tags.items()))


def _list(values: Any) -> str:
    return ", ".join(esc(v) for v in values) if isinstance(values, list) and values else "–"


def _deployment_links(assigned: Any) -> str:
    """A device's deployments, one per model (``{model: deployment name}``)."""
    if not isinstance(assigned, dict) or not assigned:
        return "–"
    return ", ".join(f"{esc(model)}: {link(_path('deployments', str(name)), name)}"
                     for model, name in sorted(assigned.items()))


def _online(value: Any) -> str:
    state = "online" if value else "offline"
    return f'<span class="dot {state}" title="{state}"></span><span class="sr">{state}</span>'


def _plots(source: str) -> str:
    return f'<section class="plots" data-telemetry="{html.escape(source, quote=True)}"><h2>Telemetry</h2></section>'


def _pre(document: Any) -> str:
    return f"<pre>{esc(json.dumps(document, indent=2, sort_keys=True, default=str))}</pre>"


def _page(request: web.Request, title: str, body: str, status: int = 200, page: str = "") -> web.Response:
    nav = "".join(f'<a href="{href}" class="{"here" if request.path == href else ""}">{text}</a>'
                  for href, text in _NAV)
    if request.app[GUARD].enabled:
        nav += '<form method="post" action="/logout" class="logout"><button>Log out</button></form>'
    text = _PAGE.substitute(title=esc(title), heading=esc(title), nav=nav, body=body, page=esc(page))
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS)


def error_page(status: int, message: str) -> web.Response:
    """A bare HTML page for an error (used before a request reaches a page handler)."""
    text = _PAGE.substitute(title=f"{status}", heading=f"{status}", page="error",
                            nav="".join(f'<a href="{h}">{t}</a>' for h, t in _NAV),
                            body=f'<p class="error">{esc(message)}</p>')
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS)


# --- pages ------------------------------------------------------------------------------------------------


def _sort_link(column: str, label: str, query: str, current: str) -> str:
    order = f"-{column}" if current == column else column
    arrow = " ▲" if current == column else " ▼" if current == f"-{column}" else ""
    href = "/?" + urlencode({k: v for k, v in (("q", query), ("sort", order)) if v})
    return f'<a href="{html.escape(href, quote=True)}">{esc(label)}</a>{arrow}'


def _device_row(row: dict[str, Any], now: float) -> list[str]:
    models = row.get("models") or []
    names = ", ".join(f"{esc(m.get('name'))}:{esc(m.get('version'))} {esc(m.get('state'))}" for m in models
                      if isinstance(m, dict)) or "–"
    return [_online(row.get("online")), link(_path("devices", str(row["device_id"])), row["device_id"]),
            esc(row.get("profile")), esc(row.get("model")), esc(row.get("model_version")),
            f'<span class="state {esc(row.get("state"))}">{esc(row.get("state"))}</span>', names,
            when(row.get("last_seen"), now)]


async def devices_page(request: web.Request) -> web.Response:
    query, sort = request.query.get("q", ""), request.query.get("sort", "device_id")
    offset, error, status = 0, "", 200
    try:
        offset = int(request.query.get("offset") or 0)
        if offset < 0:
            raise ValueError
    except ValueError:
        error, status = "offset: must be a whole number, 0 or more", 400
    rows: list[dict[str, Any]] = []
    total = 0
    if not error:
        try:
            chosen = await select(request, query, "condition")
            rows, total = await page_of_devices(request, chosen, sort, PAGE_SIZE, offset)
        except UsageError as exc:
            error, status = str(exc), 400
    columns = [("online", "●"), ("device_id", "Device"), ("profile", "Profile"), ("model", "Model"),
               ("model_version", "Version"), ("state", "State")]
    headers = [_sort_link(c, label, query, sort) for c, label in columns]
    headers += ["Models", _sort_link("last_seen", "Last seen", query, sort)]
    now = time.time()
    form = ('<form method="get" action="/" class="filter"><label>Condition <input name="q" size="60" '
            f'placeholder="{attr(_EXAMPLE_CONDITION)}" value="{attr(query)}"></label>'
            f'<input type="hidden" name="sort" value="{attr(sort)}"><button>Filter</button></form>')
    notice = f'<p class="error">{esc(error)}</p>' if error else ""
    shown = f"{offset + 1}–{offset + len(rows)} of {total}" if rows else f"0 of {total}"
    pager = "".join(
        f' {link("/?" + urlencode({"q": query, "sort": sort, "offset": o}), label)}'
        for label, o, ok in (("previous", max(0, offset - PAGE_SIZE), offset > 0),
                             ("next", offset + PAGE_SIZE, offset + PAGE_SIZE < total)) if ok)
    body = (form + notice + f'<p class="count">{shown} device(s){pager}</p>' +
            table(headers, (_device_row(r, now) for r in rows), "no device matches", ' id="devices"'))
    return _page(request, "Devices", body, status, "devices")


def _events_table(rows: Sequence[dict[str, Any]], now: float) -> str:
    def cell(kind: str, value: Any) -> str:
        if not value:
            return "–"
        where = {"device": "devices", "rollout": "rollouts", "deployment": "deployments"}[kind]
        return link(_path(where, str(value)), value)

    body = [[when(e.get("ts"), now), esc(e.get("kind")), cell("device", e.get("device_id")),
             cell("rollout", e.get("rollout_id")), cell("deployment", e.get("deployment")), esc(e.get("message"))]
            for e in rows]
    return table(["When", "Kind", "Device", "Rollout", "Deployment", "What"], body, "no events",
                 ' class="events"')


async def device_page(request: web.Request) -> web.Response:
    device_id = request.match_info["device_id"]
    row = await call(request, "device", device_id)
    events = await call(request, "events", limit=50, device_id=device_id)
    now = time.time()
    facts = [("Online", _online(row.get("online"))), ("Profile", esc(row.get("profile"))),
             ("Groups", _list(row.get("groups"))), ("Tags", _tags(row.get("tags"))),
             ("State", esc(row.get("state"))), ("Deployments", _deployment_links(row.get("deployments"))),
             ("Last seen", when(row.get("last_seen"), now))]
    models = table(["Model", "Version", "Bundle", "State", "Error"],
                   ([esc(m.get("name")), esc(m.get("version")), esc(str(m.get("bundle_sha256") or "")[:12]),
                     esc(m.get("state")), esc(m.get("error"))] for m in row.get("models") or []), "no model")
    body = (_dl(facts) + "<h2>Models</h2>" + models + _plots(f"/api/v1/telemetry?device={quote(device_id)}") +
            "<h2>Reported state</h2><details><summary>as the device reported it</summary>" +
            _pre(row.get("reported") or {}) + "</details><h2>Events</h2>" + _events_table(events, now))
    return _page(request, device_id, body, page="device")


def _deployment_cells(row: dict[str, Any]) -> list[str]:
    model = row.get("model") or {}
    name = f"{model.get('name')}:{model.get('version')}" if isinstance(model, dict) and model else None
    rollout = row.get("rollout_id")
    targeted, applied, failed = (int(row.get(k) or 0) for k in ("targeted", "applied", "failed"))
    return [link(_path("deployments", str(row["name"])), row["name"]), f"<code>{esc(row.get('target'))}</code>",
            esc(row.get("priority")), esc(name), esc(str(row.get("bundle_sha256") or "")[:12]),
            esc(targeted), esc(applied), esc(failed), progress_bar(applied, failed, targeted),
            link(_path("rollouts", rollout), rollout) if rollout else "–"]


_DEPLOYMENT_HEADERS = ["Name", "Target", "Priority", "Model", "Bundle", "Targeted", "Applied", "Failed", "Progress",
                       "Rollout"]


async def deployments_page(request: web.Request) -> web.Response:
    rows = await call(request, "deployments")
    body = table(_DEPLOYMENT_HEADERS, (_deployment_cells(r) for r in rows),
                 "no deployment: edgedeploy fleet deploy NAME BUNDLE --target CONDITION", ' id="deployments"')
    return _page(request, "Deployments", body, page="deployments")


async def deployment_page(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    row = await find_deployment(request, name)
    events = await call(request, "events", limit=50, deployment=name)
    body = (table(_DEPLOYMENT_HEADERS, [_deployment_cells(row)]) + "<h2>Policy</h2>" + _pre(row.get("policy") or {}) +
            _plots(f"/api/v1/telemetry?deployment={quote(name)}") + "<h2>Events</h2>" +
            _events_table(events, time.time()))
    return _page(request, name, body, page="deployment")


async def rollouts_page(request: web.Request) -> web.Response:
    rows = await call(request, "rollouts")
    cells = ([link(_path("rollouts", str(r["rollout_id"])), r["rollout_id"]), esc(r.get("state")),
              esc(r.get("succeeded")), esc(r.get("failed")), esc(r.get("pending")),
              esc(r.get("deployment") or r.get("selector"))] for r in reversed(rows))
    body = table(["Rollout", "State", "Succeeded", "Failed", "Pending", "Deployment or selector"], cells,
                 "no rollout yet", ' id="rollouts"')
    return _page(request, "Rollouts", body, page="rollouts")


def _wave_total(wave: dict[str, Any]) -> int:
    return sum(int(wave.get(k) or 0) for k in ("succeeded", "failed", "pending", "rolled_back"))


def _wave_row(wave: dict[str, Any]) -> str:
    index = int(wave.get("index", 0))
    label = f"{index}" + (" (canary)" if wave.get("canary") else "")
    cells = [f'<td data-field="label">{esc(label)}</td>', f'<td data-field="total">{_wave_total(wave)}</td>']
    cells += [f'<td data-field="{k}">{esc(int(wave.get(k) or 0))}</td>' for k in ("succeeded", "failed", "pending")]
    bar = progress_bar(int(wave.get("succeeded") or 0), int(wave.get("failed") or 0), _wave_total(wave), "wave")
    return f'<tr data-wave="{index}">' + "".join(cells) + f"<td>{bar}</td></tr>"


async def rollout_page(request: web.Request) -> web.Response:
    rollout_id = request.match_info["rollout_id"]
    doc = await call(request, "rollout_status", rollout_id)
    events = await call(request, "events", limit=100, rollout_id=rollout_id)
    counts = {k: int(doc.get(k) or 0) for k in ("succeeded", "failed", "pending")}
    total = sum(_wave_total(w) for w in doc.get("waves") or []) or sum(counts.values())
    summary = (f'<section id="rollout" data-rollout="{esc(rollout_id)}" data-state="{esc(doc.get("state"))}">'
               f'<p>State <b data-field="state">{esc(doc.get("state"))}</b> '
               f'<span data-field="reason" class="reason">{attr(doc.get("reason"))}</span></p>'
               f'<p><span data-field="succeeded">{counts["succeeded"]}</span> succeeded · '
               f'<span data-field="failed">{counts["failed"]}</span> failed · '
               f'<span data-field="pending">{counts["pending"]}</span> pending</p>'
               + progress_bar(counts["succeeded"], counts["failed"], total, "total") + "</section>")
    head = "".join(f"<th>{h}</th>" for h in ("Wave", "Devices", "Succeeded", "Failed", "Pending", "Progress"))
    rows = "".join(_wave_row(w) for w in doc.get("waves") or [])
    waves = f'<table id="waves"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
    body = summary + "<h2>Waves</h2>" + waves + "<h2>Events</h2>" + _events_table(events, time.time())
    return _page(request, f"Rollout {rollout_id}", body, page="rollout")


async def events_page(request: web.Request) -> web.Response:
    filters = {k: request.query.get(k) or None for k in ("device", "rollout", "deployment")}
    rows = await call(request, "events", limit=500, device_id=filters["device"], rollout_id=filters["rollout"],
                      deployment=filters["deployment"])
    inputs = "".join(f'<label>{k} <input name="{k}" value="{attr(v)}"></label>'
                     for k, v in filters.items())
    form = f'<form method="get" action="/events" class="filter">{inputs}<button>Show</button></form>'
    return _page(request, "Events", form + _events_table(rows, time.time()), page="events")


# --- login ------------------------------------------------------------------------------------------------


def _safe_next(target: str | None) -> str:
    """Only a path on this site: a login must not bounce the browser elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _login_form(next_path: str, message: str = "") -> str:
    notice = f'<p class="error">{esc(message)}</p>' if message else ""
    return (notice + '<form method="post" action="/login" class="login">'
            f'<input type="hidden" name="next" value="{esc(next_path)}">'
            '<label>Token <input type="password" name="token" autocomplete="current-password" autofocus></label>'
            "<button>Log in</button></form><p>A line of the controller's <code>--token-file</code>.</p>")


async def login_get(request: web.Request) -> web.StreamResponse:
    if not request.app[GUARD].enabled:
        raise web.HTTPSeeOther(location="/")
    return _page(request, "Log in", _login_form(_safe_next(request.query.get("next"))), page="login")


async def login_post(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    next_path = _safe_next(str(form.get("next") or "/"))
    session = request.app[GUARD].login(str(form.get("token") or ""))
    if session is None:
        return _page(request, "Log in", _login_form(next_path, "wrong token"), status=401, page="login")
    response = web.HTTPSeeOther(location=next_path)
    response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="Strict", secure=request.secure, path="/")
    return response


async def logout_post(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther(location="/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def _static_handler(name: str, content_type: str) -> Any:
    body = (CONSOLE_DIR / name).read_bytes()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    return handler


def add_console_routes(app: web.Application) -> None:
    """The console's pages, its login and its two static files."""
    app.add_routes([
        web.get("/", devices_page),
        web.get("/devices/{device_id}", device_page),
        web.get("/deployments", deployments_page),
        web.get("/deployments/{name}", deployment_page),
        web.get("/rollouts", rollouts_page),
        web.get("/rollouts/{rollout_id}", rollout_page),
        web.get("/events", events_page),
        web.get("/login", login_get),
        web.post("/login", login_post),
        web.post("/logout", logout_post),
        *(web.get(f"/static/{name}", _static_handler(name, kind)) for name, kind in _STATIC.items()),
    ])
