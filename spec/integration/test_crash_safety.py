"""Crash safety of the native archive driver: SIGKILL a process that appends in a loop, at random moments.

With storage_native_durability = "full", every append that returned (its key printed by crash_appender.lua) must be
in the archive afterwards, the database must pass PRAGMA integrity_check and every per-archive counter must equal
the real number of items. PN_CRASH_SEED=<n> replays a run's kill schedule.
"""

import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import harness

APPENDER = Path(__file__).resolve().parent / "crash_appender.lua"
USERS = 3
KILLS = 5


def read_lines(path):
    """Complete lines only: a line cut by the kill has no newline and does not count."""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]


def run_appender(tmp, data, durability, round_no, delay):
    """Starts the appender, waits for its first returned append (so a slow start on a busy machine is not
    mistaken for a driver that stopped appending), lets it run `delay` more seconds, then SIGKILLs it."""
    out = tmp / f"append-{round_no}.out"
    err = tmp / f"append-{round_no}.err"
    harness.CHILD_OUTPUTS.append(err)
    with open(out, "wb") as o, open(err, "wb") as e:
        p = subprocess.Popen([harness.LUA, str(APPENDER), "append", str(data), durability, str(USERS)],
                             stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=harness.lua_env(), cwd=str(tmp))
        deadline = time.monotonic() + 60  # bounds a hang, not a speed
        while not read_lines(out) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        alive = p.poll() is None
        if alive:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert alive, (f"round {round_no}: the appender exited by itself with {p.returncode} before the kill:\n"
                   f"{err.read_text(errors='replace')[-3000:]}")
    return [tuple(line.split("\t")) for line in read_lines(out)]


def list_archive(tmp, data, durability):
    err = tmp / "list.err"
    harness.CHILD_OUTPUTS.append(err)
    with open(err, "wb") as e:
        res = subprocess.run([harness.LUA, str(APPENDER), "list", str(data), durability, str(USERS)],
                             stdout=subprocess.PIPE, stderr=e, env=harness.lua_env(), cwd=str(tmp), timeout=120)
    assert res.returncode == 0, f"listing failed ({res.returncode}):\n{err.read_text(errors='replace')[-3000:]}"
    keys, totals = defaultdict(list), {}
    for line in res.stdout.decode().splitlines():
        parts = line.split("\t")
        if parts[0] == "total":
            totals[parts[1]] = int(parts[2]) if parts[2] != "nil" else None
        else:
            keys[parts[0]].append(parts[1])
    return keys, totals


def test_sigkill_while_appending_loses_no_returned_append(tmp_path):
    seed = int(os.environ.get("PN_CRASH_SEED", random.randrange(2 ** 32)))
    rng = random.Random(seed)
    data = tmp_path / "data"
    data.mkdir()
    returned = []
    per_round = []
    for round_no in range(KILLS):
        got = run_appender(tmp_path, data, "full", round_no, rng.uniform(0.0, 0.8))
        per_round.append(len(got))
        returned += got
    context = f"(PN_CRASH_SEED={seed}; returned appends per round: {per_round})"
    assert returned, f"no append returned at all {context}"
    assert all(n > 0 for n in per_round[1:]), f"the driver stopped appending after a crash {context}"

    keys, totals = list_archive(tmp_path, data, "full")
    # every append that returned is there, in the archive of the user it was made for
    missing = [(u, k) for u, k in returned if k not in set(keys[u])]
    assert not missing, f"{len(missing)} returned appends lost, e.g. {missing[:5]} {context}"
    for user in (f"u{i}" for i in range(1, USERS + 1)):
        dup = [k for k, n in Counter(keys[user]).items() if n > 1]
        assert not dup, f"duplicate keys in {user}'s archive: {dup[:5]}"
        assert totals.get(user) == len(keys[user]), f"driver total for {user} {totals.get(user)} != {len(keys[user])} items"
    # at most one append per kill can have committed without its key reaching stdout
    assert sum(len(v) for v in keys.values()) - len(returned) <= KILLS, context

    db = data / "prosody-native.sqlite"
    con = sqlite3.connect(str(db), timeout=30)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        counters = con.execute(
            "SELECT o.user, o.items, (SELECT count(*) FROM items i WHERE i.owner = o.id) FROM owners o"
            " WHERE o.host = 'localhost' AND o.store = 'archive'").fetchall()
        assert {u for u, _, _ in counters} == {f"u{i}" for i in range(1, USERS + 1)}
        for user, counter, real in counters:
            assert counter == real == len(keys[user]), f"{user}: counter {counter}, rows {real}, listed {len(keys[user])}"
    finally:
        con.close()


def committed_items(data):
    """Items the database itself holds, without the append log a killed process left (a plain SQLite reader)."""
    con = sqlite3.connect(f"file:{data / 'prosody-native.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        con.close()


def test_sigkill_with_normal_durability_loses_nothing_either(tmp_path):
    """Durability "normal" only gives up the fsync: a killed process (unlike a power cut) loses no append that
    returned. Appends share a transaction (group commit), so a kill lands in the middle of a batch: what the batch
    held comes back from the append log when the database is next opened. The database stays intact and counters
    exact."""
    seed = int(os.environ.get("PN_CRASH_SEED", random.randrange(2 ** 32)))
    rng = random.Random(seed)
    data = tmp_path / "data"
    data.mkdir()
    rounds, in_batch = [], []
    for r in range(3):
        rounds.append(run_appender(tmp_path, data, "normal", r, rng.uniform(0.0, 0.8)))
        # returned appends the kill left uncommitted (the next round's open replays them)
        in_batch.append(sum(len(x) for x in rounds) - committed_items(data))
    context = f"(PN_CRASH_SEED={seed}; returned per round: {[len(r) for r in rounds]}; uncommitted at the kills: {in_batch})"
    assert all(rounds), f"a round returned no append {context}"
    assert any(n > 0 for n in in_batch), f"no kill hit an open batch: group commit is not in use {context}"
    keys, totals = list_archive(tmp_path, data, "normal")
    present = {k for ks in keys.values() for k in ks}
    for r, got in enumerate(rounds):
        lost = [k for _, k in got if k not in present]
        assert not lost, f"round {r}: {len(lost)} returned appends lost, e.g. {lost[:3]} {context}"
    for user, ks in keys.items():
        assert totals[user] == len(ks)
        dup = [k for k, n in Counter(ks).items() if n > 1]
        assert not dup, f"duplicate keys in {user}'s archive (a record applied twice?): {dup[:5]}"
    # at most one append per kill can have been written without its key reaching stdout
    assert len(present) - sum(len(r) for r in rounds) <= len(rounds), context
    assert committed_items(data) == len(present), "the listing process committed what it replayed"
    con = sqlite3.connect(str(data / "prosody-native.sqlite"), timeout=30)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        bad = con.execute("SELECT o.user, o.items, (SELECT count(*) FROM items i WHERE i.owner = o.id) AS n"
                          " FROM owners o WHERE o.items != n").fetchall()
        assert not bad, bad
    finally:
        con.close()


def test_appends_continue_on_a_database_left_by_a_crash(tmp_path):
    """A crash leaves a WAL and -shm behind; a fresh process opens the file, keeps counting from the right totals and
    appends go on."""
    data = tmp_path / "data"
    data.mkdir()
    first = run_appender(tmp_path, data, "full", 0, 0.6)
    assert first
    keys_before, totals_before = list_archive(tmp_path, data, "full")
    env = harness.lua_env()
    err = tmp_path / "bounded.err"
    harness.CHILD_OUTPUTS.append(err)
    with open(err, "wb") as e:
        res = subprocess.run([harness.LUA, str(APPENDER), "append", str(data), "full", str(USERS), "30"],
                             stdout=subprocess.PIPE, stderr=e, env=env, cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0, err.read_text(errors="replace")
    added = Counter(line.split("\t")[0] for line in res.stdout.decode().splitlines())
    assert sum(added.values()) == 30
    keys_after, totals_after = list_archive(tmp_path, data, "full")
    for user in totals_before:
        assert totals_after[user] == totals_before[user] + added[user]
        assert keys_after[user][:len(keys_before[user])] == keys_before[user], "older items keep their order"
