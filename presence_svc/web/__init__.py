"""Transport: the REST endpoints, the OpenAPI document and the WebSocket endpoint. They parse,
authenticate and call the service; nothing below them knows about HTTP or WebSockets."""
