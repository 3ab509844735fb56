"""The operators' live dashboard: one page and its script and style, served by the node.

Off unless PRESENCE_DASHBOARD=true (404 otherwise). The page itself holds no data: it reads
`GET /stats` and `GET /presence/{study_id}/stats` with the operator's token, and watches a
study through the browser client (`/client/presence.js`). The token comes from the URL's
fragment (`/dashboard#token=<JWT>`, which browsers never send to the server) or a paste field.
Everything the page loads comes from the node, and its Content-Security-Policy says so.
"""

from __future__ import annotations

from presence_svc.web.pages import page_routes

# name -> media type: the only files served (no path from the URL reaches the file system).
FILES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # Same-origin only: scripts, styles, fetches and the WebSocket (CSP 3 `'self'` covers ws:).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


ROUTES = page_routes("dashboard", FILES, SECURITY_HEADERS, lambda settings: settings.dashboard)
