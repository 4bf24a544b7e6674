"""Trainer presets (`tiny`, `smol-135m`: `--config NAME`) and the demo's supervisor job, shipped as
package data (`watchtower.configs`); found through `watchtower.shipped`. `watchtower config show
NAME` prints a preset resolved, to start a job file from."""
