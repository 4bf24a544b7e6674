"""Text the TUI did not write (run and node names, alert and event text, a source's error, the user's
filter) is shown as typed: `[/x]` used to be read as Rich markup and a MarkupError killed the app."""

from __future__ import annotations

import asyncio
import time

from textual.widgets import DataTable, Static

from watchtower.tui.app import RunScreen, WatchtowerApp
from watchtower.tui.model import Alert, RankRow, Snapshot

ODD = "[/x]"  # a closing tag with no opening one: MarkupError if parsed as markup


class OddNames:
    """A source whose every string field holds markup-like text."""

    describe = f"scrape {ODD}"

    def poll(self) -> Snapshot:
        row = RankRow(run=ODD, replica_group="0", rank="0", node=f"{ODD}node", step=5.0, loss=2.0,
                      heartbeat=time.time())
        alert = Alert(name=ODD, severity="page", summary=f"loss spiked {ODD}", labels={"run": ODD})
        event = {"time": time.time(), "event": ODD, "message": f"group {ODD} [bold]"}
        return Snapshot(rows=[row], alerts=[alert], events=[event], source=self.describe,
                        error=f"partial: {ODD}").finish(time.time())


def plain(app: WatchtowerApp, widget_id: str) -> str:
    return str(app.screen.query_one(f"#{widget_id}", Static).render())


def test_markup_in_names_and_in_the_filter_is_shown_as_text_not_a_markup_error():
    async def drive():
        app = WatchtowerApp(OddNames(), interval=3600, timestamps=False)
        async with app.run_test(size=(80, 24)) as pilot:
            deadline = time.monotonic() + 60
            while app.polls < 1:
                assert time.monotonic() < deadline, "no poll in 60 s"
                await pilot.pause(0.05)
            await pilot.pause()
            table = app.screen.query_one("#runs", DataTable)
            assert str(table.get_row_at(0)[0]).strip() == ODD
            assert f"ERROR partial: {ODD}" in plain(app, "status")
            await pilot.press("enter")
            assert isinstance(app.screen, RunScreen) and app.screen.run == ODD
            await pilot.press("slash", *ODD, "enter")
            await pilot.pause()
            assert app.screen.filter == ODD
            assert f"filter {ODD}" in plain(app, "status")
            assert app.screen.query_one("#ranks", DataTable).row_count == 1, "the filter matched the node"
            assert f"loss spiked {ODD}" in plain(app, "alerts")
            assert f"group {ODD} [bold]" in plain(app, "events")
            assert app.is_running

    asyncio.run(drive())
