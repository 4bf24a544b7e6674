"""`watchtower tui`: the Textual app a person runs over ssh on the cluster's login node.

Keyboard first; fits 80×24; every state is also spelled out in text (DOWN, a `!` on slow or stale
ranks), so it still reads in a terminal without colour. Polling runs in a thread worker, so a slow or
dead target never freezes the screen; the screens only redraw what the last `Snapshot` says.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static

from watchtower.tui.model import STALE_HEARTBEAT_S, History, RankRow, Snapshot

SLOW_RATIO = 1.2  # step time this far above the run's median marks a straggler (as the alert rule)
SORTS = ("worst", "rank", "step", "tok/s", "ratio", "heartbeat")


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def fmt_si(value: float | None) -> str:
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def fmt_age(age: float | None) -> str:
    if age is None:
        return "-"
    return f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m"


# Names, alert and event text, a source's error and the user's filter are not ours: anything shown
# from them goes through `Text(...)` (never a str, which Static and DataTable parse as Rich markup,
# where a run named `a[/x]` raises MarkupError and kills the app).


def rank_cells(r: RankRow) -> list[Text]:
    state = "DOWN" if not r.up else ("spare" if r.participating == 0 else "up")
    slow = r.step_ratio is not None and r.step_ratio > SLOW_RATIO
    stale = r.heartbeat_age is not None and r.heartbeat_age > STALE_HEARTBEAT_S
    return [
        Text(r.replica_group), Text(r.rank), Text(r.node[:9]),
        Text(state, style="bold red" if not r.up else ("dim" if state == "spare" else "green")),
        Text(fmt(r.step, ".0f"), justify="right"),
        Text(fmt(r.loss, ".3f"), justify="right"),
        Text(fmt_si(r.tokens_per_s), justify="right"),
        Text(fmt(r.mfu, ".0%"), justify="right"),
        Text(fmt(r.data_wait, ".0%"), justify="right"),
        Text(fmt(r.step_ratio, ".2f") + ("!" if slow else ""), justify="right", style="yellow" if slow else ""),
        Text(fmt(r.gpu_util, ".0%"), justify="right"),
        Text(fmt(r.gpu_mem, ".0%") + ("!" if r.gpu_alloc_retries or r.gpu_ooms else ""), justify="right",
             style="red" if r.gpu_ooms else ("yellow" if r.gpu_alloc_retries else "")),
        Text(fmt(r.gpu_temp, ".0f"), justify="right"),
        Text(fmt_age(r.heartbeat_age) + ("!" if stale else ""), justify="right", style="red" if stale else ""),
    ]


# name -> width (cell padding is 0: each width leaves one blank between columns); 78 fits 80×24
RANK_COLUMNS = {"grp": 4, "rk": 3, "node": 10, "state": 6, "step": 7, "loss": 7, "tok/s": 7, "MFU": 5,
                "wait": 5, "ratio": 6, "GPU": 5, "mem": 5, "°C": 4, "hb": 4}


RUN_COLUMNS = {"run": 24, "groups": 6, "ranks": 5, "down": 4, "step": 7, "loss": 7, "tok/s": 7, "alerts": 6}


def sort_key(name: str):
    keys = {
        "worst": lambda r: tuple(-x if isinstance(x, float) else not x for x in r.badness()),
        "rank": lambda r: (r.replica_group.zfill(6), r.rank.zfill(6)),
        "step": lambda r: -(r.step or 0),
        "tok/s": lambda r: -(r.tokens_per_s or 0),
        "ratio": lambda r: -(r.step_ratio or 0),
        "heartbeat": lambda r: -(r.heartbeat_age or 0),
    }
    return keys[name]


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]
    TEXT = """[b]Watchtower TUI — keys[/b]

runs view  enter   open the run under the cursor
run view   s       sort: worst, rank, step, tok/s, ratio, hb
           w       jump to the worst rank
           /       filter by node, group or state
           escape  clear the filter, then back to runs
anywhere   r  poll now     ?  this help     q  quit

ratio  step time ÷ the run's median; ! above 1.2
hb     seconds since the rank's last step; ! above 60
mem    GPU memory used; ! the allocator retried (red: an OOM)
DOWN   its /metrics (or Prometheus's up) is silent
worst  DOWN first, then a stale hb, then the ratio"""

    def compose(self) -> ComposeResult:
        yield Static(self.TEXT, id="help")


class RunsScreen(Screen):
    BINDINGS = [Binding("enter", "open", "open run")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="status")
        table = DataTable(id="runs", cursor_type="row")
        for name, width in RUN_COLUMNS.items():
            table.add_column(name, key=name, width=width)
        yield table
        yield Static("", id="runs-hint")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_from(self.app.snapshot)

    def refresh_from(self, snap: Snapshot) -> None:
        self.query_one("#status", Static).update(Text(self.app.status_line()))
        table = self.query_one("#runs", DataTable)
        cursor = table.cursor_row
        table.clear()
        for s in snap.summaries():
            table.add_row(Text(s.run[:24]), str(s.groups), str(s.ranks),
                          Text(str(s.down), style="bold red" if s.down else ""),
                          fmt(s.step, ".0f"), fmt(s.loss, ".3f"), fmt_si(s.tokens_per_s),
                          Text(str(s.alerts), style="bold red" if s.alerts else ""), key=s.run)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        self.query_one("#runs-hint", Static).update(
            "enter: open a run   ?: help   q: quit" if table.row_count else "waiting for ranks…")

    def action_open(self) -> None:
        table = self.query_one("#runs", DataTable)
        if table.row_count:
            run = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
            self.app.push_screen(RunScreen(run))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.app.push_screen(RunScreen(event.row_key.value))


class RunScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "runs"),
        Binding("s", "sort", "sort"),
        Binding("w", "worst", "worst rank"),
        Binding("slash", "filter", "filter"),
    ]

    def __init__(self, run: str):
        super().__init__()
        self.run = run
        self.sort = "worst"
        self.filter = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="status")
        yield Static("", id="goodput")  # shown once the run's supervisor reports its goodput
        yield Static("", id="budget")  # shown once a rank reports tokens per parameter
        table = DataTable(id="ranks", cursor_type="row", cell_padding=0)
        for name, width in RANK_COLUMNS.items():
            table.add_column(name, key=name, width=width)
        yield table
        yield Static("", id="memory")  # the highlighted rank's GPU memory peaks, where it has CUDA
        yield Input(placeholder="filter: node, group or state (enter to apply, escape to clear)", id="filter")
        with Horizontal(id="charts"):
            with Vertical():
                yield Static("loss", id="loss-label")
                yield Sparkline([], id="loss")
            with Vertical():
                yield Static("tokens/s", id="tokens-label")
                yield Sparkline([], id="tokens")
        with Horizontal(id="bottom"):
            with VerticalScroll(id="alerts-box"):
                yield Static("", id="alerts")
            with VerticalScroll(id="events-box"):
                yield Static("", id="events")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.title = f"run {self.run}"
        self.refresh_from(self.app.snapshot)

    def visible_rows(self, snap: Snapshot) -> list[RankRow]:
        rows = [r for r in snap.rows if r.run == self.run]
        if self.filter:
            needle = self.filter.lower()
            rows = [r for r in rows if needle in " ".join(
                (r.node, f"g{r.replica_group}", f"r{r.rank}", "down" if not r.up else "up")).lower()]
        rows = sorted(rows, key=sort_key("rank"))  # ties keep group/rank order (sorted() is stable)
        return sorted(rows, key=sort_key(self.sort))

    def refresh_from(self, snap: Snapshot) -> None:
        self.query_one("#status", Static).update(Text(
            self.app.status_line() + f"  sort {self.sort}" + (f"  filter {self.filter}" if self.filter else "")))
        goodput, line = snap.goodput.get(self.run), self.query_one("#goodput", Static)
        line.display = goodput is not None
        line.update(Text(goodput.line() if goodput else ""))
        budget, line = snap.budget_line(self.run), self.query_one("#budget", Static)
        line.display = budget is not None
        line.update(Text(budget or ""))
        table = self.query_one("#ranks", DataTable)
        keep = None
        if table.row_count:
            keep = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        table.clear()
        rows = self.visible_rows(snap)
        for r in rows:
            table.add_row(*rank_cells(r), key="/".join(r.key))
        keys = ["/".join(r.key) for r in rows]
        if keep in keys:
            table.move_cursor(row=keys.index(keep), scroll=False)
        self.show_memory(keys[table.cursor_row] if keys else None)
        history = self.app.history
        loss, tokens = list(history.loss.get(self.run, [])), list(history.tokens.get(self.run, []))
        self.query_one("#loss", Sparkline).data = loss
        self.query_one("#tokens", Sparkline).data = tokens
        self.query_one("#loss-label", Static).update(f"loss {fmt(loss[-1] if loss else None, '.3f')}")
        self.query_one("#tokens-label", Static).update(f"tokens/s {fmt_si(tokens[-1] if tokens else None)}")
        alerts = [a for a in snap.alerts if a.run in (self.run, "")]
        self.query_one("#alerts", Static).update(Text.assemble(
            ("alerts\n", "bold"), *[(f"{a.severity or '-':<6} {a.name}: {a.summary}\n",
                                     "red" if a.severity == "page" else "") for a in alerts])
            if alerts else Text("alerts\nnone firing", style="green"))
        events = snap.events[-30:]
        self.query_one("#events", Static).update(Text.assemble(
            ("supervisor events\n", "bold"),
            *[f"{time.strftime('%H:%M:%S', time.localtime(e.get('time', 0)))} {e.get('event', '?')}: "
              f"{e.get('message', '')}\n" for e in reversed(events)]) if events else "supervisor events\n-")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "ranks":
            self.show_memory(event.row_key.value)

    def show_memory(self, key: str | None) -> None:
        """The line under the table: the highlighted rank's allocator peaks, retries and OOMs (hidden
        for a rank without CUDA, so a CPU run's screen does not change)."""
        row = next((r for r in self.app.snapshot.rows if "/".join(r.key) == key), None)
        line = row.memory_line() if row else None
        box = self.query_one("#memory", Static)
        box.display = line is not None
        box.update(Text(line or ""))

    def action_back(self) -> None:
        if self.filter or self.query_one("#filter", Input).display:
            self._set_filter("")
            return
        self.app.pop_screen()

    def action_sort(self) -> None:
        self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        self.refresh_from(self.app.snapshot)

    def action_worst(self) -> None:
        rows = self.visible_rows(self.app.snapshot)
        if not rows:
            return
        worst = max(rows, key=lambda r: r.badness())
        self.query_one("#ranks", DataTable).move_cursor(row=rows.index(worst))

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = self.filter
        box.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._set_filter(event.value.strip())

    def _set_filter(self, value: str) -> None:
        self.filter = value
        box = self.query_one("#filter", Input)
        box.display = False
        self.query_one("#ranks", DataTable).focus()
        self.refresh_from(self.app.snapshot)


class WatchtowerApp(App):
    TITLE = "Watchtower"
    CSS = """
    #status { height: 1; background: $boost; }
    #goodput { height: 1; }
    #memory { height: 1; }
    #runs { height: 1fr; }
    #ranks { height: 1fr; min-height: 5; }
    #filter { height: 3; }
    #charts { height: 3; }
    #charts Vertical { width: 1fr; }
    #charts Static { height: 1; }
    #charts Sparkline { height: 2; }
    #bottom { height: 7; }
    #alerts-box, #events-box { width: 1fr; border-left: vkey $primary; padding: 0 1; }
    #help { width: 66; height: auto; padding: 1 2; border: round $primary; background: $panel; }
    HelpScreen { align: center middle; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("r", "poll", "poll now"),
    ]

    def __init__(self, source, interval: float = 2.0, run: str | None = None, timestamps: bool = True):
        """timestamps=False leaves the wall clock off the screen (snapshot tests)."""
        super().__init__()
        self.source = source
        self.timestamps = timestamps
        self.interval = interval
        self.start_run = run
        self.snapshot = Snapshot()
        self.history = History()
        self.polls = 0

    def on_mount(self) -> None:
        self.push_screen(RunsScreen())
        if self.start_run:
            self.push_screen(RunScreen(self.start_run))
        self.action_poll()
        self.set_interval(self.interval, self.action_poll)

    def status_line(self) -> str:
        s = self.snapshot
        when = "never" if not s.taken_at else (
            time.strftime("%H:%M:%S", time.localtime(s.taken_at)) if self.timestamps else "polled")
        up = sum(r.up for r in s.rows)
        source = s.source if len(s.source) <= 34 else s.source[:33] + "…"
        text = f"{source or 'polling…'}  {when}  up {up}/{len(s.rows)}"
        return f"{text}   ERROR {s.error}" if s.error else text

    def action_poll(self) -> None:
        self.fetch()

    @work(exclusive=True, thread=True)
    def fetch(self) -> None:
        try:
            snap = self.source.poll()
        except Exception as err:  # noqa: BLE001 - a source bug shows in the status line, not a traceback
            snap = Snapshot(source=getattr(self.source, "describe", "?"), error=str(err)).finish(time.time())
        self.call_from_thread(self.apply, snap)

    def apply(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.history.add(snap)
        self.polls += 1
        for screen in self.screen_stack:
            if hasattr(screen, "refresh_from") and screen.is_mounted:
                screen.refresh_from(snap)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())
