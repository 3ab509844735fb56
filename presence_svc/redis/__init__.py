"""Redis: the store and node registry, connections and retries, automatic pipelining, Redis
Cluster routing, the Lua scripts, every key and channel name, and the fan-out's pub/sub links."""
