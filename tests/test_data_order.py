"""The data order under faults: replica groups joining, dying, idling as hot spares, redoing steps.

Each group holds its own PackedBatches, as each trainer process does; a reference written from the
spec (permutation per epoch, global batch = batch × micro-steps × participants, rank r takes every
P-th window of each micro-batch) says what each participant must read.
"""

from __future__ import annotations

import pytest
import torch

from watchtower.trainer.data import PackedBatches

SEQ, BATCH, MICRO, SEED = 4, 2, 2, 7
WINDOWS = 50  # small, so that the schedules below cross epochs


def loader() -> PackedBatches:
    tokens = torch.arange(WINDOWS * SEQ + 1)  # token id // SEQ names the window a row starts at
    return PackedBatches(tokens, SEQ, BATCH, SEED, micro_steps=MICRO)


def window_ids(batch) -> list[int]:
    return (batch.inputs[:, 0] // SEQ).tolist()


class Reference:
    """The order a job must read, one committed step at a time."""

    def __init__(self) -> None:
        self.epoch, self.cursor = 0, 0

    def step(self, participants: int) -> tuple[int, list[list[int]]]:
        """(epoch, the windows of each rank) for the next committed step."""
        need = BATCH * MICRO * participants
        if self.cursor + need > WINDOWS:
            self.epoch, self.cursor = self.epoch + 1, 0
        order = torch.randperm(WINDOWS, generator=torch.Generator().manual_seed(SEED + self.epoch)).tolist()
        chunk = order[self.cursor: self.cursor + need]
        self.cursor += need
        per_micro = BATCH * participants
        return self.epoch, [[w for m in range(MICRO) for w in chunk[m * per_micro + r: (m + 1) * per_micro: participants]]
                            for r in range(participants)]


def run_step(groups: dict[str, PackedBatches], roles: dict[str, int | None], participants: int,
             committed: bool = True) -> dict[str, list[int]]:
    """One step of every live group in `roles` (rank, or None for a spare); what each participant read."""
    read = {}
    for name, rank in roles.items():
        groups[name].begin_step(rank, participants)
        if rank is not None:
            read[name] = [w for _ in range(MICRO) for w in window_ids(next(groups[name]))]
    for name in roles:
        groups[name].end_step(committed)
    return read


# (participants, roles): "a" dies after step 3 and the spare "c" takes a seat; "b" runs alone with
# "c" as its spare; "a" comes back healed and all three participate; then "c" is a spare again.
SCHEDULE = (
    [(2, {"a": 0, "b": 1, "c": None})] * 3
    + [(2, {"b": 0, "c": 1})] * 2
    + [(1, {"b": 0, "c": None})] * 2
    + [(3, {"a": 0, "b": 1, "c": 2})] * 3
    + [(2, {"a": 0, "b": 1, "c": None})] * 4
)


def test_spare_cursor_advances_by_the_global_batch_of_the_participants():
    """A hot spare used to advance by batch × 1 while participants advanced by batch × participants,
    so a promoted spare re-read some windows and never read others. Every group, spare or not, must
    hold the same cursor after every step, and each participant reads its rank's slice."""
    groups = {name: loader() for name in "abc"}
    ref = Reference()
    seen: dict[int, list[int]] = {}
    for number, (participants, roles) in enumerate(SCHEDULE, start=1):
        if number == 8:  # "a" rejoins: torchft heals it with a live peer's state
            groups["a"].load_state_dict(groups["b"].state_dict())
        read = run_step(groups, roles, participants)
        epoch, expected = ref.step(participants)
        for name, rank in roles.items():
            if rank is not None:
                assert read[name] == expected[rank], (number, name, rank)
            assert groups[name].state_dict() == {"epoch": ref.epoch, "cursor": ref.cursor}, (number, name)
        seen.setdefault(epoch, []).extend(w for ids in read.values() for w in ids)
    assert len(seen) >= 2, "the schedule must cross an epoch"
    for epoch, windows in seen.items():
        assert len(windows) == len(set(windows)), f"epoch {epoch}: a window was read twice"


def test_uncommitted_step_reads_its_windows_again():
    """A step torchft does not commit is redone: the redo must read the same global batch, even when
    the quorum that redoes it is smaller, and the cursor must not move."""
    groups = {name: loader() for name in "ab"}
    run_step(groups, {"a": 0, "b": 1}, 2)
    before = groups["b"].state_dict()
    failed = run_step(groups, {"a": 0, "b": 1}, 2, committed=False)
    assert groups["b"].state_dict() == before
    redo = run_step(groups, {"a": 0, "b": 1}, 2)
    assert redo == failed
    alone = loader()  # a smaller quorum redoes it: it starts on the same windows
    alone.load_state_dict(before)
    assert set(run_step({"b": alone}, {"b": 0}, 1)["b"]) < set(failed["a"] + failed["b"])


def test_plain_iteration_is_one_group_alone():
    plain, stepped = loader(), loader()
    for _ in range(30):  # crosses epochs
        stepped.begin_step(0, 1)
        expected = [window_ids(next(stepped)) for _ in range(MICRO)]
        stepped.end_step(committed=True)
        assert [window_ids(next(plain)) for _ in range(MICRO)] == expected
        assert plain.state_dict() == stepped.state_dict()


def test_a_spare_reads_nothing_and_a_step_holds_micro_steps_batches():
    data = loader()
    data.begin_step(None, 2)
    with pytest.raises(RuntimeError, match="hot spare"):
        next(data)
    data.begin_step(1, 2)
    for _ in range(MICRO):
        next(data)
    with pytest.raises(RuntimeError, match="end_step"):
        next(data)


@pytest.mark.parametrize("max_bytes", [1500, 100_000])
def test_corpus_size_the_supervisor_checks_is_what_the_trainer_loads(tmp_path, max_bytes):
    """supervise refuses a corpus too small for its groups from file sizes alone (corpus_tokens);
    that count must be what load_tokens gives, or it would refuse a job that fits (or pass one that
    every group then refuses at step 1)."""
    from watchtower.trainer.data import DataConfig, corpus_tokens, load_tokens

    for i, text in enumerate(["a" * 700, "", "b" * 1200, "c" * 90]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    for source in ("", str(tmp_path)):
        cfg = DataConfig(source=source, max_bytes=max_bytes, stage="never")
        assert corpus_tokens(cfg) == len(load_tokens(cfg)), (source, max_bytes)


# ---- issue 14: data that caused a spike, poisoned (bad_data) and skipped (data.skip_steps) -------------

def read_steps(data: PackedBatches, steps: int, participants: int = 2) -> list[list[int]]:
    """Commit `steps` steps of every participant; the windows each step read, all ranks together."""
    out = []
    for _ in range(steps):
        read = []
        for rank in range(participants):
            data.begin_step(rank, participants)
            read += [w for _ in range(MICRO) for w in window_ids(next(data))]
            data.end_step(committed=rank == participants - 1)  # one plan per rank here; the cursor moves once
        out.append(read)
    return out


@pytest.mark.parametrize("first,steps,ranges", [
    (3, 2, [(0, 16, 32)]),  # 8 windows a step (2 groups): steps 3-4 are positions 16..32 of epoch 0
    (6, 2, [(0, 40, 48), (1, 0, 8)]),  # 6 steps fit an epoch of 50: the skip crosses into epoch 1
])
def test_skip_leaves_exactly_the_global_batches_of_its_steps_unread(first, steps, ranges):
    plain = read_steps(loader(), first + steps + 2)
    skipping = loader()
    before = read_steps(skipping, first - 1)
    assert skipping.skip(first, steps, participants=2) == ranges
    after = read_steps(skipping, 3)
    assert before + after == plain[:first - 1] + plain[first - 1 + steps:][:3], "the data jumps by exactly the skip"
    resumed = loader()
    resumed.load_state_dict(skipping.state_dict())
    assert resumed.skipped == {first}, "a checkpoint or a heal carries the skip, so it is not applied twice"


def test_bad_data_poisons_the_windows_its_steps_read_in_a_run_from_the_start():
    from watchtower.trainer.faults import PoisonedBatches

    plain = read_steps(loader(), 9)
    poisoned = loader().step_window_ids(first=8, steps=2, participants=2)
    assert poisoned == {(1, w) for step in plain[7:9] for w in step}  # steps 8-9 are in epoch 1
    clean, dirty = loader(), loader()
    wrapped = PoisonedBatches(dirty, poisoned, vocab=WINDOWS * SEQ + 1)
    hits = 0
    for step in range(1, 10):
        for rank in (0, 1):
            clean.begin_step(rank, 2), dirty.begin_step(rank, 2)
            for _ in range(MICRO):
                a, b = next(clean), next(wrapped)
                assert torch.equal(a.inputs, b.inputs)
                hit = [(dirty.last_read[0], w) in poisoned for w in dirty.last_read[1].tolist()]
                assert [not torch.equal(x, y) for x, y in zip(a.targets, b.targets)] == hit, step
                hits += sum(hit)
            clean.end_step(rank == 1), dirty.end_step(rank == 1)
    assert hits == len(poisoned) == 2 * 8, "every poisoned window read once, and no other"
