"""The demo page (`make demo`): a small chess study built on the browser client.

Off unless PRESENCE_DEMO=true (404 otherwise). The page holds no data and no secret: tokens
come from the URL's fragment (`/demo#token=<JWT>&study=<id>`, never sent to the server), and it
watches the study through `/client/presence.js` like any frontend would.
"""

from __future__ import annotations

from presence_svc.web.pages import page_routes

# name -> media type: the only files served (no path from the URL reaches the file system).
FILES = {
    "index.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}
HEADERS = {
    # The page talks to other nodes too (the client's failover list), hence connect-src.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self' ws: wss: http: https:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


ROUTES = page_routes("demo", FILES, HEADERS, lambda settings: settings.demo)
