"""The supervisor (`watchtower supervise job.toml`): torchft Lighthouse, replica groups, hot spares."""
