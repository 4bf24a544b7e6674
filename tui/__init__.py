"""The terminal UI for the login node (`watchtower tui`). Reads only what /metrics or Prometheus serve."""
