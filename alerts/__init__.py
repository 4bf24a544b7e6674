"""Prometheus alert rules (`rules.yml`) and Alertmanager routing (`alertmanager.yml`), shipped as
package data (`watchtower.alerts`); find them through `watchtower.shipped`, export them to a
Prometheus host with `watchtower alerts export DIR`. `tests/` holds their promtool unit tests (not
shipped)."""
