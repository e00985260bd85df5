"""The service map in the browser (`l7lab ui`): `graph` turns a lab's flow records into nodes
and edges coloured by verdict, `server` serves the page (`static/`: hand-written SVG in plain
JavaScript, no build step, nothing fetched from elsewhere) and a JSON API with live updates.
See docs/ui.md."""

DEFAULT_LISTEN = "127.0.0.1:12000"  # `l7lab ui --listen`'s default (here: the CLI reads it without aiohttp)
